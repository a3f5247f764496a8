#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests against the real binary, a real
# Prometheus and promtool. Installs Prometheus (Debian's package) when it is missing.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "installing prometheus and promtool (apt-get install prometheus)" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
cargo test --locked "$@"
