#!/usr/bin/env bash
# Set up, then run the whole test suite against real registries and clients.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
exec python3 -m pytest "$@"
