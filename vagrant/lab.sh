#!/usr/bin/env bash
# The Vagrant lab's host side, behind `make vagrant-up` / `make vagrant-destroy`: the host's
# packages and libvirt daemon, the local box, `vagrant up` with timestamps, and a teardown
# that also removes what a failed or interrupted `vagrant up` left behind.
#   bash vagrant/lab.sh host      install Vagrant, vagrant-libvirt, libvirt, QEMU; start libvirtd
#   bash vagrant/lab.sh up        host, then the box (LBCTL_BOX=lbctl/bookworm64), then vagrant up
#   bash vagrant/lab.sh destroy   vagrant destroy, leftover domains/volumes/networks, the
#                                 libvirt daemons this script started
#   bash vagrant/lab.sh leftovers what of the lab libvirt still holds, one line each
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOCAL_BOX=lbctl/bookworm64                 # LOCAL_BOX in vagrant/Vagrantfile
DOMAIN_PREFIX=lbctl_                       # lv.default_prefix in vagrant/Vagrantfile
NETWORKS=(lbctl-client_net lbctl-backend_net vagrant-libvirt)
# Pids of the daemons this script started (tests point it elsewhere).
state_dir=${LBCTL_VAGRANT_STATE_DIR:-/run/lbctl-vagrant}
log_dir="$here/.vagrant"
action=${1:-}

# The host's packages for the lab (not lbctl/setup.sh's: those are for where lbctl runs).
host_pkgs=(vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils
           debootstrap rsync e2fsprogs)

say() { printf 'vagrant-lab: %s\n' "$*"; }
die() { printf 'vagrant-lab: error: %s\n' "$*" >&2; exit 1; }

case "$action" in
    host|up|destroy|leftovers) ;;
    *) die "unknown action '${action}'; hint: bash vagrant/lab.sh host|up|destroy|leftovers" ;;
esac
[ "$(id -u)" -eq 0 ] || die "must run as root (libvirt's system daemon, debootstrap); hint: sudo make vagrant-$action"

systemd_runs() { [ -d /run/systemd/system ]; }
virsh_() { virsh -q -c qemu:///system "$@"; }

host() {
    local missing=() p
    for p in "${host_pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${host_pkgs[*]}"
        say "installing host packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get could not install: ${missing[*]}"
    fi
    kvm_group
    if virsh_ version >/dev/null 2>&1; then
        return 0
    fi
    if systemd_runs; then
        systemctl start libvirtd.service || die "systemctl start libvirtd failed; see journalctl -u libvirtd"
    else
        # No systemd (a container, a sandbox): the daemons run by themselves, and `destroy`
        # stops them again because this script started them.
        mkdir -p "$state_dir"
        if ! pgrep -x virtlogd >/dev/null; then
            virtlogd -d -p "$state_dir/virtlogd.pid" || die "virtlogd did not start"
        fi
        libvirtd -d -p "$state_dir/libvirtd.pid" || die "libvirtd did not start"
        say "started libvirtd (no systemd here); make vagrant-destroy stops it"
    fi
    local _
    for _ in $(seq 50); do virsh_ version >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "libvirtd does not answer on qemu:///system"
}

# /dev/kvm in group kvm, as udev makes it on a Debian host: a host without udev (a container,
# a sandbox) may show it in another group. libvirt checks KVM as its QEMU user (group kvm) while
# its capability probe of QEMU saw KVM work; libvirtd then finds its cached capabilities
# "outdated" on every call that needs them and probes QEMU again (two QEMU starts, 4 s of CPU):
# defining the lab's five domains took 8 to 14 min of that, and it went on while they booted.
# The previous group is kept in the state directory; `destroy` puts it back.
kvm_group() {
    local dev=${LBCTL_KVM_DEV:-/dev/kvm} grp
    [ -c "$dev" ] && getent group kvm >/dev/null || return 0
    grp=$(stat -c %G "$dev")
    [ "$grp" = kvm ] && return 0
    mkdir -p "$state_dir"
    [ -e "$state_dir/kvm-group" ] || printf '%s %s\n' "$grp" "$(stat -c %a "$dev")" >"$state_dir/kvm-group"
    { chgrp kvm "$dev" && chmod g+rw "$dev"; } || die "cannot give $dev to group kvm"
    say "$dev was in group $grp, not kvm as udev makes it: now kvm (libvirt's QEMU user), so libvirtd keeps its QEMU capabilities; make vagrant-destroy puts $grp back"
}

kvm_group_restore() {
    local dev=${LBCTL_KVM_DEV:-/dev/kvm} grp mode
    [ -e "$state_dir/kvm-group" ] || return 0
    read -r grp mode <"$state_dir/kvm-group"
    if [ -e "$dev" ] && chgrp "$grp" "$dev" && chmod "$mode" "$dev"; then
        say "$dev back in group $grp"
    fi
    rm -f "$state_dir/kvm-group"
}

up() {
    host
    local box=${LBCTL_BOX:-}
    if [ "$box" = "$LOCAL_BOX" ]; then
        local t0=$SECONDS
        bash "$here/build-box.sh"
        say "box: $((SECONDS - t0)) s"
    fi
    mkdir -p "$log_dir"
    local log t0=$SECONDS
    log="$log_dir/up-$(date -u +%Y%m%dT%H%M%SZ).log"
    trap 'say "interrupted; remove what was started with: make vagrant-destroy"; exit 130' INT TERM
    # One after the other: five VMs booting at once under software emulation starve each
    # other (and the host) of CPU. LBCTL_VAGRANT_PARALLEL=1 boots them together.
    local parallel=--no-parallel
    [ "${LBCTL_VAGRANT_PARALLEL:-0}" = 1 ] && parallel=--parallel
    if [ "$parallel" = --parallel ]; then
        say "vagrant up (all VMs at once; log with timestamps: $log)"
    else
        say "vagrant up (one VM after the other; log with timestamps: $log)"
    fi
    set +e
    (cd "$here" && vagrant up --provider=libvirt "$parallel") 2>&1 \
        | while IFS= read -r line; do
            # A progress bar redraws one line with carriage returns: keep its last state.
            printf '%(%H:%M:%S)T %s\n' -1 "${line##*$'\r'}"
          done | tee "$log"
    local status=("${PIPESTATUS[@]}")
    set -e
    local rc=${status[0]}
    [ "$rc" = 0 ] || die "vagrant up failed after $((SECONDS - t0)) s (exit $rc); see $log; remove what was started with: make vagrant-destroy"
    say "up and provisioned in $((SECONDS - t0)) s; next: make vagrant-demo"
}

destroy() {
    if command -v vagrant >/dev/null; then
        (cd "$here" && vagrant destroy -f) || say "vagrant destroy failed; removing the lab's libvirt objects directly"
    fi
    if command -v virsh >/dev/null && virsh_ version >/dev/null 2>&1; then
        # What an interrupted `vagrant up` leaves: domains and disks Vagrant does not know
        # about yet, and the lab's networks.
        local dom vol net
        for dom in $(virsh_ list --all --name | grep "^$DOMAIN_PREFIX" || true); do
            virsh_ destroy "$dom" >/dev/null 2>&1 || true
            virsh_ undefine "$dom" --remove-all-storage >/dev/null 2>&1 || virsh_ undefine "$dom" >/dev/null 2>&1 || true
            say "removed leftover VM $dom"
        done
        for vol in $(virsh_ vol-list default 2>/dev/null | awk -v p="$DOMAIN_PREFIX" 'index($1, p) == 1 { print $1 }'); do
            virsh_ vol-delete --pool default "$vol" >/dev/null 2>&1 && say "removed leftover disk $vol"
        done
        # Base volumes of earlier builds of the local box (vagrant-libvirt names them by the
        # box's timestamp): no VM of the lab uses them any more; the newest stays.
        for vol in $(virsh_ vol-list default 2>/dev/null | awk '$1 ~ /^lbctl-VAGRANTSLASH-bookworm64_vagrant_box_image_/ { print $1 }' | sort -V | head -n -1); do
            virsh_ vol-delete --pool default "$vol" >/dev/null 2>&1 && say "removed the old box volume $vol"
        done
        for net in "${NETWORKS[@]}"; do
            virsh_ net-info "$net" >/dev/null 2>&1 || continue
            virsh_ net-destroy "$net" >/dev/null 2>&1 || true
            virsh_ net-undefine "$net" >/dev/null 2>&1 || true
            say "removed network $net"
        done
    fi
    # The daemons this script started (no systemd): stopped, with the firewall chains libvirtd
    # made for its networks.
    local d pid
    for d in libvirtd virtlogd; do
        [ -e "$state_dir/$d.pid" ] || continue
        pid=$(cat "$state_dir/$d.pid")
        if kill -0 "$pid" 2>/dev/null; then kill "$pid"; say "stopped $d (pid $pid)"; fi
        rm -f "$state_dir/$d.pid"
        if [ "$d" = libvirtd ]; then
            local _
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            remove_libvirt_chains
        fi
    done
    kvm_group_restore
}

# libvirtd's empty LIBVIRT_* chains and the jumps to them (it leaves them when it stops).
remove_libvirt_chains() {
    command -v iptables >/dev/null || return 0
    local ipt table chain rule
    for ipt in iptables ip6tables; do
        for table in filter nat mangle; do
            "$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-A" && $0 ~ /-j LIBVIRT_/' | while read -r rule; do
                # shellcheck disable=SC2086 # the rule is iptables' own words
                "$ipt" -t "$table" ${rule/-A/-D} 2>/dev/null || true
            done
            for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ { print $2 }'); do
                "$ipt" -t "$table" -F "$chain" 2>/dev/null || true
                "$ipt" -t "$table" -X "$chain" 2>/dev/null || true
            done
        done
    done
}

leftovers() {
    local found=0 name
    if ! command -v virsh >/dev/null || ! virsh_ version >/dev/null 2>&1; then
        # No libvirtd (destroy stops the one `up` started): what it would bring back is its
        # saved definitions, and a QEMU of the lab could outlive it.
        local etc=${LBCTL_LIBVIRT_ETC:-/etc/libvirt/qemu} f
        for f in "$etc/$DOMAIN_PREFIX"*.xml; do
            [ -e "$f" ] && { echo "domain $(basename "$f" .xml) (defined; libvirtd is not running)"; found=1; }
        done
        for name in "${NETWORKS[@]}"; do
            [ -e "$etc/networks/$name.xml" ] && { echo "network $name (defined; libvirtd is not running)"; found=1; }
        done
        if pgrep -f "guest=$DOMAIN_PREFIX" >/dev/null; then
            echo "qemu $(pgrep -f "guest=$DOMAIN_PREFIX" | tr '\n' ' ')(running without libvirtd)"; found=1
        fi
        [ "$found" = 1 ] || say "nothing of the lab is left in libvirt"
        return 0
    fi
    for name in $(virsh_ list --all --name | grep "^$DOMAIN_PREFIX" || true); do
        echo "domain $name"; found=1
    done
    for name in $(virsh_ net-list --all --name); do
        case " ${NETWORKS[*]} " in *" $name "*) echo "network $name"; found=1 ;; esac
    done
    [ "$found" = 1 ] || say "nothing of the lab is left in libvirt"
}

"$action"
