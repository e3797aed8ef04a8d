#!/usr/bin/env bash
# Idempotent install of what `lbctl bench peers` measures with: nginx (backends), haproxy
# and nftables (peers), wrk and iperf3 (load), netsniff-ng's trafgen (packet rate), perf,
# and matplotlib in the project's venv (plots). Run lbctl/setup.sh first (it makes the venv).
#   bash lbctl/bench-setup.sh
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

say() { printf 'bench-setup: %s\n' "$*"; }
die() { printf 'bench-setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root; hint: sudo bash lbctl/bench-setup.sh"
command -v apt-get >/dev/null || die "apt-get not found; this script supports Debian 12 and Ubuntu 22.04+"
[ -x "$venv/bin/python" ] || die "no venv at $venv; hint: bash lbctl/setup.sh first"

# Package -> a file it installs, so a host that has the tool from elsewhere is left alone.
declare -A tool_of=(
    [nginx]=/usr/sbin/nginx
    [haproxy]=/usr/sbin/haproxy
    [nftables]=/usr/sbin/nft
    [wrk]=/usr/bin/wrk
    [iperf3]=/usr/bin/iperf3
    [netsniff-ng]=/usr/sbin/trafgen
    [linux-perf]=/usr/bin/perf
)
# Daemons these packages would start on the host: the bench starts its own, in namespaces.
services=(nginx haproxy iperf3)

missing=()
for p in "${!tool_of[@]}"; do
    [ -x "${tool_of[$p]}" ] || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' init scripts from starting daemons on the host during the install.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    cleanup() { if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
    trap cleanup EXIT
    apt-get update -qq
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || die "apt-get could not install: ${missing[*]}"
    fi
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        for s in "${services[@]}"; do
            for p in "${missing[@]}"; do
                # Only the services this run installed; a host's own nginx stays as it was.
                if [ "$p" = "$s" ]; then
                    systemctl disable --now "$s" >/dev/null 2>&1 || true
                    say "disabled the host service '$s' that the package enabled"
                fi
            done
        done
    fi
fi

if ! "$venv/bin/python" -c 'import matplotlib' 2>/dev/null; then
    say "installing matplotlib into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check 'matplotlib>=3.6'
fi

say "ready; run: make bench, or $venv/bin/python -m lbctl bench peers --results-dir bench/results --doc docs/benchmarks.md   (--quick for a short run)"
