#!/usr/bin/env bash
# deps.sh - install every Debian package outboxd needs to build, test and run
# its test services.  This list is the only one: add packages here.
#
# Installs only what is missing; runs `apt-get update` only when something
# is missing; uses sudo only when not root.  Safe to run again and again.
set -euo pipefail

PACKAGES=(
    build-essential cmake pkg-config     # toolchain
    libcmocka-dev                        # unit tests
    libpq-dev                            # sidecar: PostgreSQL check-back
    libhiredis-dev                       # sidecar: Redis spool / sink
    libmicrohttpd-dev libjansson-dev     # http_api
    libnats-dev                          # sidecar: NATS JetStream sink
    libcurl4-openssl-dev                 # HTTP sink, integration tests
    postgresql postgresql-15-pgtap       # check-back tests, sql/ pgTAP tests
    redis-server nats-server             # spool and sink integration tests
    curl jq                              # API smoke tests and examples
    python3 python3-psycopg2             # examples/order_service.py
    clang libclang-rt-14-dev             # libFuzzer target (scripts/fuzz.sh)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "deps: all ${#PACKAGES[@]} packages installed"
    exit 0
fi

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    echo "deps: missing packages: ${missing[*]}" >&2
    echo "deps: not root and sudo is not installed; install them as root" >&2
    exit 1
fi

echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
