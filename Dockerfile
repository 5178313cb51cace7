# The spillway binary (processor, ingress, mock-llm, dlq, status) in a slim runtime image.
#   docker build -t spillway .
FROM rust:1.88-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p spillway --bin spillway \
    && cp target/release/spillway /usr/local/bin/spillway

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 spillway \
    && mkdir -p /var/lib/spillway/state && chown -R 10001 /var/lib/spillway
COPY --from=build /usr/local/bin/spillway /usr/local/bin/spillway
COPY config /etc/spillway/examples
COPY deploy/compose /etc/spillway
USER 10001
ENTRYPOINT ["/usr/local/bin/spillway"]
CMD ["processor", "--config", "/etc/spillway/processor.toml"]
