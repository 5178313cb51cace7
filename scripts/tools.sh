#!/usr/bin/env bash
# Installs (once, cached) the external programs Spillway's tests and local runs need:
#   tansu         Kafka-protocol broker      (cargo install tansu 0.6.0, ~15 min once)
#   rivven-schema Confluent-compatible schema registry (cargo install rivven-schema 0.0.22, ~4 min once)
# Usage: scripts/tools.sh [tansu|rivven-schema|all]   prints the binary path(s) on stdout.
# Cache: $SPILLWAY_TOOLS_DIR (default ~/.cache/spillway/tools); each tool lives in its own
# versioned root so a version bump reinstalls instead of silently reusing the old binary.
set -euo pipefail

TOOLS_DIR="${SPILLWAY_TOOLS_DIR:-$HOME/.cache/spillway/tools}"
TANSU_VERSION=0.6.0
RIVVEN_VERSION=0.0.22

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

tansu() { install_crate tansu "$TANSU_VERSION" "dynostore,libsql" tansu; }
rivven() { install_crate rivven-schema "$RIVVEN_VERSION" "" rivven-schema; }

case "${1:-all}" in
  tansu) tansu ;;
  rivven-schema) rivven ;;
  all) tansu; rivven ;;
  *) echo "usage: $0 [tansu|rivven-schema|all]" >&2; exit 2 ;;
esac
