# The spillway binary (processor, ingress, dlq, status) and the provider simulator
# (spillway-mock-llm, its own crate, for the compose stack) in a slim runtime image. The service
# is built without the fault-injection feature.
#   docker build -t spillway .
FROM rust:1.88-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p spillway --bin spillway -p spillway-mock-llm --bin spillway-mock-llm \
    && cp target/release/spillway target/release/spillway-mock-llm /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 spillway \
    && mkdir -p /var/lib/spillway/state && chown -R 10001 /var/lib/spillway
COPY --from=build /usr/local/bin/spillway /usr/local/bin/spillway-mock-llm /usr/local/bin/
COPY config /etc/spillway/examples
COPY deploy/compose /etc/spillway
USER 10001
ENTRYPOINT ["/usr/local/bin/spillway"]
CMD ["processor", "--config", "/etc/spillway/processor.toml"]
