#!/usr/bin/env bash
# Install what zotlb and its tests need, skipping whatever is already there.
#   scripts/setup.sh          the runtime: zotlb itself and two local registries
#   scripts/setup.sh --test   also the test and bench tools
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

# Debian packages, by the command each one provides.
declare -A pkg_for=([docker-registry]=docker-registry [skopeo]=skopeo)
if [ "$want_test" = 1 ]; then
  pkg_for+=([podman]=podman [haproxy]=haproxy [nginx]=nginx [wrk]=wrk [ab]=apache2-utils [curl]=curl [chromium]=chromium)
fi
missing=()
for cmd in "${!pkg_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${pkg_for[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "setup: please install: ${missing[*]}" >&2
  fi
fi

extras=""
[ "$want_test" = 1 ] && extras="[test]"
python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
