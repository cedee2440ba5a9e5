#!/usr/bin/env bash
# Installs what a fresh Debian machine with only rustup lacks to build stratus:
# cmake and a C toolchain (Pingora's zlib-ng and zstd, ring), protoc (the build script of
# otlp-embedded, the Jaeger UI inside `stratus demo`), rustfmt and clippy.
# Safe to run again; it only installs what is missing.
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v make >/dev/null 2>&1 || need+=(make)
command -v "${PROTOC:-protoc}" >/dev/null 2>&1 || need+=(protobuf-compiler)
for extra in "$@"; do
  # /usr/sbin is not on a non-root PATH (nginx lives there).
  command -v "$extra" >/dev/null 2>&1 || [ -x "/usr/sbin/$extra" ] || need+=("$extra")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  # Debian starts a service it installs (nginx on port 80); nothing here wants that.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt >/dev/null
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy >/dev/null
fi
