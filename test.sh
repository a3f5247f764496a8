#!/usr/bin/env bash
# The whole test suite: unit tests and end-to-end tests against the real binary, a real
# Prometheus and promtool, a real PostgreSQL, a real browser (chromium), the Standard Webhooks reference library, a real SMTP server
# (aiosmtpd), a container image built with podman, systemd-analyze and a Kubernetes schema
# checker. Installs what is missing: Debian's packages (prometheus, podman, debootstrap)
# and PyPI's (standardwebhooks, aiosmtpd, kubernetes-validate).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  echo "installing prometheus and promtool (apt-get install prometheus)" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# openssl makes the certificates of the TLS tests.
if ! command -v openssl >/dev/null; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq openssl >/dev/null
fi
# The Standard Webhooks reference library, which checks the signatures postbackd sends.
if ! python3 -c "import standardwebhooks" 2>/dev/null; then
  echo "installing standardwebhooks (pip install standardwebhooks)" >&2
  python3 -m pip install -q --disable-pip-version-check standardwebhooks
fi
# A real SMTP server for the e-mail tests: aiosmtpd, for the python3 the tests run (PyPI;
# Debian's python3-aiosmtpd when pip cannot).
if ! python3 -c "import aiosmtpd" 2>/dev/null; then
  echo "installing aiosmtpd (pip install aiosmtpd)" >&2
  if ! python3 -m pip install -q --disable-pip-version-check aiosmtpd; then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-aiosmtpd >/dev/null
  fi
fi
# The container image test: podman builds images without a daemon; debootstrap makes the
# base image from Debian's packages (kept in podman's storage between runs).
if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
  echo "installing podman and debootstrap (apt-get install podman debootstrap)" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq podman debootstrap >/dev/null
fi
# The deploy files' checkers: systemd-analyze (Debian's systemd) and kubernetes-validate
# (PyPI; it carries the Kubernetes schemas, so it needs no cluster and no network).
if ! command -v systemd-analyze >/dev/null; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq systemd >/dev/null
fi
if ! command -v kubernetes-validate >/dev/null; then
  echo "installing kubernetes-validate (pip install kubernetes-validate)" >&2
  python3 -m pip install -q --disable-pip-version-check kubernetes-validate
fi
# A real PostgreSQL server for the shared store's tests: Debian's postgresql (initdb and
# pg_ctl under /usr/lib/postgresql/<version>/bin) and psql. The tests start a throwaway
# cluster on a free port as the postgres user and stop it at the end.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v psql >/dev/null; then
  echo "installing postgresql (apt-get install postgresql)" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql postgresql-client >/dev/null
fi
# The web page's browser test: Debian's chromium, driven by playwright-core from npm (the
# version pinned in tests/browser/package-lock.json; it never downloads a browser).
if ! command -v chromium >/dev/null || ! command -v node >/dev/null; then
  echo "installing chromium and nodejs (apt-get install chromium nodejs npm)" >&2
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium nodejs npm >/dev/null
fi
if [[ ! -d tests/browser/node_modules/playwright-core ]]; then
  echo "installing playwright-core (npm ci in tests/browser)" >&2
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --locked "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over the test binaries.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
