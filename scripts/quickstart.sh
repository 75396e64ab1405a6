#!/usr/bin/env bash
# Set up, then run zotlb on 127.0.0.1:5000 in front of two local registries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python3 -m zotlb local "$@"
