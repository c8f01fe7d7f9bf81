#!/usr/bin/env bash
# Debian packages that the integration tests start as a user would have them (Xvfb, MariaDB, Tango's
# own DataBaseds and Starter, ...), one list per feature in tools/debian-packages/*.txt ('#' comments).
# Installed when missing and this runs as root with apt-get; otherwise it says what is missing, and the
# tests that need them skip with that reason.
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t packages < <(cat debian-packages/*.txt | sed 's/#.*//' | tr -s ' \t' '\n' | grep -v '^$' | sort -u)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || echo "apt-get update failed; trying with the cached lists"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "not installed (the tests that need them will skip): ${missing[*]}; as root: apt-get install ${missing[*]}"
fi
