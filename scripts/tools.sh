#!/usr/bin/env bash
# Installs (once, cached) the external programs Spillway's tests and local runs need:
#   kafka         Apache Kafka's broker (KRaft), its jars from Maven Central via
#                 scripts/kafka/pom.xml; needs Java 17+ and Maven (~10 s once). Prints the
#                 directory that holds libs/ (the classpath is '<dir>/libs/*').
#   rivven-schema Confluent-compatible schema registry (cargo install rivven-schema 0.0.22, ~4 min once)
#   tansu         the earlier Kafka-protocol stand-in (cargo install tansu 0.6.0, ~15 min once);
#                 no longer used by the tests or scripts, kept for bench comparisons only.
#   cargo-fuzz    the libFuzzer driver scripts/fuzz.sh uses (cargo install cargo-fuzz 0.13.2,
#                 ~2 min once); not part of `all`, the tests do not need it.
# Usage: scripts/tools.sh [kafka|rivven-schema|tansu|cargo-fuzz|all]   prints the path(s) on
# stdout; `all` is what the tests need: kafka and rivven-schema.
# Cache: $SPILLWAY_TOOLS_DIR (default ~/.cache/spillway/tools); each tool lives in its own
# versioned root so a version bump reinstalls instead of silently reusing the old binary.
set -euo pipefail

TOOLS_DIR="${SPILLWAY_TOOLS_DIR:-$HOME/.cache/spillway/tools}"
TANSU_VERSION=0.6.0
# Keep in step with <kafka.version> in scripts/kafka/pom.xml.
KAFKA_VERSION=4.1.1
RIVVEN_VERSION=0.0.22
CARGO_FUZZ_VERSION=0.13.2

log() { printf '[tools] %s\n' "$*" >&2; }

install_crate() { # name version features bin
  local name=$1 version=$2 features=$3 bin=$4
  local root="$TOOLS_DIR/$name-$version"
  local path="$root/bin/$bin"
  if [ -x "$path" ]; then
    echo "$path"; return 0
  fi
  log "installing $name $version into $root (one-time; cached afterwards)"
  mkdir -p "$root"
  local args=(install "$name" --locked --version "$version" --root "$root")
  [ -n "$features" ] && args+=(--features "$features")
  # Separate target dir so the tool build never invalidates the project's target/.
  if ! CARGO_TARGET_DIR="$TOOLS_DIR/target" cargo "${args[@]}" >&2; then
    log "FAILED to install $name $version (see cargo output above)"
    return 1
  fi
  [ -x "$path" ] || { log "installed $name but $path is missing"; return 1; }
  echo "$path"
}

# Java 17+ and Maven, or a loud failure that says which is missing.
need_java17() {
  command -v java >/dev/null 2>&1 || { log "FAILED: Apache Kafka needs Java 17 or newer, and no 'java' is on PATH"; return 1; }
  local v
  v=$(java -XshowSettings:properties -version 2>&1 | awk -F' = ' '/java.specification.version/ {print $2}')
  case "$v" in
    ''|1.*|[0-9]|1[0-6]) log "FAILED: Apache Kafka $KAFKA_VERSION needs Java 17 or newer; 'java' on PATH is ${v:-unknown}"; return 1 ;;
  esac
}

kafka() {
  local root="$TOOLS_DIR/kafka-$KAFKA_VERSION"
  # The marker is written last, so an interrupted copy is never taken for a complete one.
  if [ -f "$root/libs/.complete" ]; then
    need_java17 || return 1
    echo "$root"; return 0
  fi
  need_java17 || return 1
  command -v mvn >/dev/null 2>&1 || { log "FAILED: installing Apache Kafka needs Maven ('mvn' is not on PATH)"; return 1; }
  local pom
  pom="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kafka/pom.xml"
  grep -q "<kafka.version>$KAFKA_VERSION</kafka.version>" "$pom" \
    || { log "FAILED: $pom does not pin Kafka $KAFKA_VERSION (tools.sh and the pom disagree)"; return 1; }
  log "installing Apache Kafka $KAFKA_VERSION from Maven Central into $root (one-time; cached afterwards)"
  rm -rf "$root.partial"
  mkdir -p "$root.partial"
  # Maven 3.8 prints colour resets even in batch mode; strip them from its output.
  if ! mvn -B -q -Dstyle.color=never -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$root.partial/libs" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2; then
    log "FAILED: mvn could not fetch Apache Kafka $KAFKA_VERSION (see its output above)"
    return 1
  fi
  # The broker's and the format step's main classes, checked in the jar (a JRE has no
  # `jar` tool; unzip reads the jar too).
  local list=(jar tf)
  if ! command -v jar >/dev/null 2>&1; then
    command -v unzip >/dev/null 2>&1 \
      || { log "FAILED: checking the Kafka jars needs 'jar' (a JDK) or 'unzip'"; return 1; }
    list=(unzip -Z1)
  fi
  for class in kafka/Kafka.class kafka/tools/StorageTool.class; do
    "${list[@]}" "$root.partial/libs/kafka_2.13-$KAFKA_VERSION.jar" | grep -x "$class" >/dev/null \
      || { log "FAILED: $class is not in kafka_2.13-$KAFKA_VERSION.jar"; return 1; }
  done
  touch "$root.partial/libs/.complete"
  rm -rf "$root"
  mv "$root.partial" "$root"
  echo "$root"
}

tansu() { install_crate tansu "$TANSU_VERSION" "dynostore,libsql" tansu; }
rivven() { install_crate rivven-schema "$RIVVEN_VERSION" "" rivven-schema; }
cargo_fuzz() { install_crate cargo-fuzz "$CARGO_FUZZ_VERSION" "" cargo-fuzz; }

case "${1:-all}" in
  kafka) kafka ;;
  rivven-schema) rivven ;;
  tansu) tansu ;;
  cargo-fuzz) cargo_fuzz ;;
  all) kafka; rivven ;;
  *) echo "usage: $0 [kafka|rivven-schema|tansu|cargo-fuzz|all]" >&2; exit 2 ;;
esac
