#!/usr/bin/env bash
# One-shot, idempotent host set-up for lbctl, then optionally the demo or the tests.
#   bash lbctl/setup.sh          install what is missing
#   bash lbctl/setup.sh demo     ... then run the demo in the namespace lab
#   bash lbctl/setup.sh test     ... then run the whole test suite (installs its tools too)
#   bash lbctl/setup.sh packages list the Debian packages it installs, "demo|test PACKAGE"
#   bash lbctl/setup.sh venv     only the venv with lbctl installed (for an image built in a
#                                chroot, vagrant/build-box.sh: the packages are there already,
#                                and the running kernel is the build host's)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"
action=${1:-}

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Debian packages for every program lbctl, the lab and the demo run (a minimal Debian, such
# as a container image, has none of them); tests/unit/test_setup_packages.py proves the list
# complete against what the code executes.
pkgs=(
    python3 python3-venv  # the interpreter bcc is built for, and its venv
    python3-bpfcc         # bcc: compiles and loads the XDP program
    libbpf1               # BPF_PROG_TEST_RUN (lbctl explain, the bpf tests)
    iproute2              # ip netns exec: the lab's servers and commands in namespaces
    procps                # sysctl: forwarding, rp_filter and IPv6 in the lab's namespaces
    ethtool               # veth offloads the lab needs for XDP_REDIRECT
    make                  # the README's make targets
    bird2                 # BGP: each agent's own BIRD announces its VIPs; the lab's router
    etcd-server           # etcd: one desired state for every node (lbctl cluster, agent --config)
    gcc python3-dev       # compile the L7 proxy's C head parser (lbctl/l7/_heads.c) at install
)
# Only for `setup.sh test`: programs the tests run themselves.
test_pkgs=(
    shellcheck                     # checks the provisioning scripts and this one
    ruby vagrant vagrant-libvirt   # evaluate and validate vagrant/Vagrantfile
    openssl                        # a throwaway certificate for the L7 proxy's TLS tests
    tcpdump                        # reads the pcapng `lbctl capture` writes, as users would
    curl                           # a real HTTP/2 client (nghttp2) for the L7 proxy's h2 tests
)

case "$action" in
    ""|demo|test|packages|venv) ;;
    # Before anything is installed: bad input changes nothing.
    *) die "unknown action '$action'; hint: use 'demo', 'test', 'packages', 'venv' or nothing" ;;
esac
if [ "$action" = packages ]; then
    printf 'demo %s\n' "${pkgs[@]}"
    printf 'test %s\n' "${test_pkgs[@]}"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (XDP, bpffs and namespaces need it); hint: sudo bash lbctl/setup.sh $action"
command -v apt-get >/dev/null || die "apt-get not found; this script supports Debian 12 and Ubuntu 22.04+"

# The host: Debian packages, kernel headers and bpffs. Skipped by `venv`, which runs where
# they are in place already but `uname -r` is another machine's (a chroot).
host_setup() {
    wanted=("${pkgs[@]}")
    [ "$action" = test ] && wanted+=("${test_pkgs[@]}")
    missing=()
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done

    # bcc compiles against kernel headers at /lib/modules/$(uname -r)/build.
    kver=$(uname -r)
    # The distribution's default headers: Debian names them by architecture, Ubuntu "generic".
    if grep -qi '^ID=ubuntu' /etc/os-release 2>/dev/null; then
        default_headers=linux-headers-generic
    else
        default_headers=linux-headers-$(dpkg --print-architecture)
    fi
    need_headers=0
    [ -e "/lib/modules/$kver/build/Makefile" ] || need_headers=1
    if [ "$need_headers" = 1 ]; then
        if apt-cache policy "linux-headers-$kver" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            missing+=("linux-headers-$kver")
        elif ! dpkg-query -W -f='${Status}' "$default_headers" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$default_headers")
        fi
    fi

    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # Retry once: the package list may be stale on a long-lived host.
        if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
                || die "apt-get could not install: ${missing[*]}"
        fi
        # Re-resolve: a kernel without its own headers package gets the distribution's.
        if [ "$need_headers" = 1 ] && [ ! -e "/lib/modules/$kver/build/Makefile" ] \
            && ! dpkg-query -W -f='${Status}' "linux-headers-$kver" 2>/dev/null | grep -q "install ok installed"; then
            dpkg-query -W -f='${Status}' "$default_headers" 2>/dev/null | grep -q "install ok installed" \
                || apt-get install -y -qq --no-install-recommends "$default_headers" >/dev/null
        fi
    fi

    if [ ! -e "/lib/modules/$kver/build/Makefile" ]; then
        # The running kernel has no headers package: use the distribution's newest headers.
        # shellcheck disable=SC2010  # module directory names are plain kernel versions
        hdr=$(ls -d /lib/modules/*/build 2>/dev/null | grep -v "^/lib/modules/$kver/" | sort -V | tail -n1 || true)
        [ -n "$hdr" ] || die "no kernel headers found for $kver; hint: apt-get install $default_headers"
        hdir=$(dirname "$hdr")
        if [ -e "/lib/modules/$kver" ] && [ ! -L "/lib/modules/$kver" ]; then
            ln -sfn "$(readlink -f "$hdir/build")" "/lib/modules/$kver/build"
            [ -e "$hdir/source" ] && ln -sfn "$(readlink -f "$hdir/source")" "/lib/modules/$kver/source"
        else
            ln -sfn "$hdir" "/lib/modules/$kver"
        fi
        say "kernel $kver has no headers package; bcc will compile against $(basename "$hdir") headers (linked as /lib/modules/$kver)"
    fi

    # bpffs: pinned maps let separate lbctl commands change a running balancer.
    if ! mount -t bpf | grep -q ' /sys/fs/bpf '; then
        mkdir -p /sys/fs/bpf
        mount -t bpf bpf /sys/fs/bpf
        say "mounted bpffs at /sys/fs/bpf"
    fi
}
[ "$action" = venv ] || host_setup

# The venv must come from the system python3: bcc is only built for it.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
    rm -rf "$venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
    say "created $venv (system python3 with site packages, so bcc imports)"
fi
# Reinstalled when the metadata or the C extension's source changes (an editable install
# compiles the extension once, in place).
stamp="$venv/.installed-$(cat "$repo/pyproject.toml" "$repo/setup.py" "$repo/lbctl/l7/_heads.c" \
    | sha256sum | cut -c1-16)"
# ... or when the compiled head parser is missing (a synced or copied tree without it).
if [ ! -e "$stamp" ] || ! (cd "$repo" && "$venv/bin/python" -c 'import lbctl.l7._heads' 2>/dev/null); then
    say "installing lbctl and its Python dependencies into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "${repo}[test]"
    rm -f "$venv"/.installed-*
    touch "$stamp"
fi
if [ "$(readlink -f /usr/local/bin/lbctl 2>/dev/null)" != "$venv/bin/lbctl" ]; then
    ln -sfn "$venv/bin/lbctl" /usr/local/bin/lbctl
    say "lbctl is on PATH as /usr/local/bin/lbctl"
fi

case "$action" in
    "") say "ready; try: lbctl demo   (or: $venv/bin/lbctl demo)" ;;
    venv) say "venv ready: $venv" ;;
    demo) exec "$venv/bin/lbctl" demo ;;
    test) cd "$repo" && exec "$venv/bin/python" -m pytest tests -ra ;;
esac
