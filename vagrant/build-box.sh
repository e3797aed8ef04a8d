#!/usr/bin/env bash
# Builds the Vagrant lab's Debian 12 box for libvirt on this host, without Vagrant Cloud, and
# registers it as lbctl/bookworm64 (select it with LBCTL_BOX=lbctl/bookworm64, vagrant/README.md).
#
#   sudo bash vagrant/build-box.sh [--mirror URL] [--out DIR] [--disk-gb N] [--force]
#
# debootstrap builds the root tree from a Debian mirror (by default the one this host's apt
# uses); the tree gets the Debian kernel and its initramfs, the `vagrant` user with Vagrant's
# well-known insecure key, sshd, sudo, the Debian packages lbctl/setup.sh installs and the venv
# it makes (`setup.sh venv`), so a VM provisions without apt or pip. mkfs.ext4 -d
# turns the tree into the root partition of a raw disk with GRUB in its boot sectors: nothing
# is mounted or loop-attached. The disk becomes the box's qcow2 image.
# Idempotent: a box already registered from the same inputs is kept; --force rebuilds.
set -euo pipefail

BOX_NAME=lbctl/bookworm64
SUITE=bookworm
guest_repo=/srv/lbctl # GUEST_REPO in vagrant/Vagrantfile
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
out=/var/cache/lbctl/vagrant-box # outside the repository, which Vagrant syncs into every VM
mirror=""
disk_gb=8
force=0

say() { printf 'build-box: %s\n' "$*"; }
die() { printf 'build-box: error: %s\n' "$*" >&2; exit 1; }
step_no=0
step() { step_no=$((step_no + 1)); say "[$step_no/8] $* ($(date -u +%H:%M:%S))"; }

usage() {
    cat <<'EOF'
usage: sudo bash vagrant/build-box.sh [--mirror URL] [--out DIR] [--disk-gb N] [--force]
  --mirror URL   Debian mirror for debootstrap and for the VMs' apt (default: the host's
                 apt sources for bookworm, from /etc/apt/sources.list and sources.list.d)
  --out DIR      where the tree, the image and the .box file go
                 (default /var/cache/lbctl/vagrant-box)
  --disk-gb N    the VM disk's virtual size in GiB (default 8; qcow2, allocated on use)
  --force        rebuild even if lbctl/bookworm64 was registered from the same inputs
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; mirror=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
        --disk-gb) [ $# -ge 2 ] || die "--disk-gb needs a number"; disk_gb=$2; shift 2 ;;
        --force) force=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
if ! [[ "$disk_gb" =~ ^[0-9]+$ ]] || [ "$disk_gb" -lt 4 ] || [ "$disk_gb" -gt 1024 ]; then
    die "--disk-gb must be a whole number of GiB from 4 to 1024, not '$disk_gb'"
fi

# The host's Debian mirror for $SUITE (one-line or deb822 sources); security updates too.
host_mirror() {
    local suite=$1
    {
        cat /etc/apt/sources.list 2>/dev/null || true
        cat /etc/apt/sources.list.d/*.list 2>/dev/null || true
    } | sed -E 's/\[[^]]*\]//' | awk -v s="$suite" '$1 == "deb" && $3 == s { print $2; exit }'
    # deb822 .sources: URIs and Suites lines of one stanza.
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v s="$suite" '
        /^[[:space:]]*$/ { if (uri != "" && hit) { print uri; exit } uri = ""; hit = 0; next }
        tolower($1) == "uris:" { uri = $2 }
        tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == s) hit = 1 }
        END { if (uri != "" && hit) print uri }' || true
}
if [ -z "$mirror" ]; then
    mirror=$(host_mirror "$SUITE" | head -n1)
    [ -n "$mirror" ] || die "no Debian $SUITE mirror in this host's apt sources; hint: --mirror URL"
fi
[[ "$mirror" =~ ^(https?|file):// ]] || die "--mirror must be an http(s):// or file:// URL, not '$mirror'"
security=$(host_mirror "$SUITE-security" | head -n1)

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap chroots); hint: sudo bash vagrant/build-box.sh"
for tool in debootstrap mkfs.ext4 qemu-img vagrant chroot rsync; do
    command -v "$tool" >/dev/null \
        || die "$tool not found; hint: sudo bash vagrant/lab.sh host installs the lab's host packages"
done
vagrant plugin list 2>/dev/null | grep -q '^vagrant-libvirt' \
    || die "the vagrant-libvirt plugin is missing; hint: sudo bash vagrant/lab.sh host"
# Vagrant's insecure public key, from the Vagrant installed here: Vagrant logs in with it once
# and replaces it with a key of the VM's own.
vagrant_pub=""
for f in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
         /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    [ -e "$f" ] && { vagrant_pub=$f; break; }
done
[ -n "$vagrant_pub" ] || die "Vagrant's insecure key (keys/vagrant.pub) not found in the Vagrant install"

# The Debian packages lbctl/setup.sh installs (its own list), so provisioning finds them all.
mapfile -t lbctl_pkgs < <(bash "$repo/lbctl/setup.sh" packages | awk '$1 == "demo" { print $2 }')
[ ${#lbctl_pkgs[@]} -gt 0 ] || die "lbctl/setup.sh packages listed nothing"
# What a Vagrant box needs: init, sshd, sudo, a DHCP client for the management NIC (Vagrant
# writes ifupdown stanzas for the others), rsync for the synced folder, dbus for hostnamectl.
base_pkgs=(systemd-sysv udev kmod dbus openssh-server sudo ifupdown isc-dhcp-client iproute2
           rsync ca-certificates curl less)
# The kernel, headers of the same version for bcc, and GRUB's BIOS modules (no grub-pc: its
# scripts would install to the build host's disk).
kernel_pkgs=(linux-image-amd64 linux-headers-amd64 initramfs-tools grub-pc-bin)

shopt -s nullglob
host_ca_files=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
tree_inputs=$(printf '%s\n' "$SUITE" "$mirror" "$security" | sha256sum | cut -c1-16)
inputs=$(printf '%s\n' "$tree_inputs" "$disk_gb" "${base_pkgs[@]}" "${kernel_pkgs[@]}" \
         "${lbctl_pkgs[@]}" | cat - "$0" "$vagrant_pub" "${host_ca_files[@]}" \
         "$repo/lbctl/setup.sh" "$repo/pyproject.toml" "$repo/setup.py" "$repo/lbctl/l7/_heads.c" \
         | sha256sum | cut -c1-16)
mkdir -p "$out"
box_file="$out/lbctl-bookworm64-libvirt.box"
stamp="$out/registered-$inputs"
if [ "$force" = 0 ] && [ -e "$stamp" ] \
    && vagrant box list 2>/dev/null | grep -q "^$BOX_NAME *(libvirt,"; then
    say "$BOX_NAME (libvirt) is registered and up to date with this script's inputs; --force rebuilds"
    exit 0
fi

tree="$out/rootfs"
disk="$out/disk.raw"
t0=$(date +%s)

# -- 1. the root tree
step "debootstrap Debian $SUITE from $mirror"
if [ ! -e "$tree/.lbctl-debootstrap-$tree_inputs" ]; then
    rm -rf "$tree"
    debootstrap --variant=minbase --include=apt-utils,ca-certificates "$SUITE" "$tree" "$mirror" \
        >"$out/debootstrap.log" 2>&1 || { tail -n 20 "$out/debootstrap.log" >&2; die "debootstrap failed (log: $out/debootstrap.log)"; }
    touch "$tree/.lbctl-debootstrap-$tree_inputs"
else
    say "      tree from an earlier run of the same inputs kept"
fi

in_tree() { chroot "$tree" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
# The chroot's package scripts see a /proc and /dev; unmounted again however this script ends.
mounted=()
cleanup() {
    local m
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do m=${mounted[$i]}; umount -l "$m" 2>/dev/null || true; done
    rm -f "$tree/usr/sbin/policy-rc.d"
}
trap cleanup EXIT
for fs in proc sys dev dev/pts; do
    mountpoint -q "$tree/$fs" && continue
    mkdir -p "$tree/$fs"
    case "$fs" in
        proc) mount -t proc proc "$tree/proc" ;;
        sys) mount -t sysfs sysfs "$tree/sys" ;;
        dev) mount --bind /dev "$tree/dev" ;;
        dev/pts) mount -t devpts devpts "$tree/dev/pts" ;;
    esac
    mounted+=("$tree/$fs")
done
# Services installed into the tree must not start on the build host.
printf '#!/bin/sh\nexit 101\n' >"$tree/usr/sbin/policy-rc.d"
chmod 755 "$tree/usr/sbin/policy-rc.d"

# -- 2. packages: the box's own, the kernel, and lbctl's
step "installing the kernel, sshd, sudo and lbctl/setup.sh's packages (${lbctl_pkgs[*]})"
{
    echo "deb $mirror $SUITE main"
    echo "deb $mirror $SUITE-updates main"
    [ -z "$security" ] || echo "deb $security $SUITE-security main"
} >"$tree/etc/apt/sources.list"
cp /etc/resolv.conf "$tree/etc/resolv.conf"
# The CAs this host's administrator added (a TLS-inspecting proxy's, a company's): without
# them pip in the VMs fails certificate checks where the host's own pip succeeds.
mkdir -p "$tree/usr/local/share/ca-certificates"
host_cas=()
for ca in "${host_ca_files[@]}"; do
    install -m 644 "$ca" "$tree/usr/local/share/ca-certificates/"
    host_cas+=("$(basename "$ca")")
done
in_tree apt-get update -qq >"$out/apt.log" 2>&1 || { tail -n 20 "$out/apt.log" >&2; die "apt-get update in the tree failed"; }
in_tree apt-get install -y -qq --no-install-recommends \
    "${base_pkgs[@]}" "${kernel_pkgs[@]}" "${lbctl_pkgs[@]}" >>"$out/apt.log" 2>&1 \
    || { tail -n 20 "$out/apt.log" >&2; die "apt-get install in the tree failed (log: $out/apt.log)"; }
in_tree apt-get clean
if [ ${#host_cas[@]} -gt 0 ]; then
    in_tree update-ca-certificates >/dev/null
    say "      trusts this host's added CAs too: ${host_cas[*]}"
fi
kver=$(in_tree linux-version list | sort -V | tail -n1)
if [ -z "$kver" ] || [ ! -e "$tree/boot/initrd.img-$kver" ]; then die "no kernel with an initramfs in the tree"; fi
[ -e "$tree/lib/modules/$kver/build/Makefile" ] \
    || die "the tree's kernel $kver has no matching headers (linux-headers-amd64 gave another version)"
say "      kernel $kver, headers at /lib/modules/$kver/build"

# -- 3. the box's configuration
step "the vagrant user, sshd, sudo, network, first-boot host keys"
in_tree id vagrant >/dev/null 2>&1 || in_tree useradd -m -s /bin/bash -U vagrant
echo 'vagrant:vagrant' | in_tree chpasswd
echo 'root:vagrant' | in_tree chpasswd
install -d -m 700 -o 1000 -g 1000 "$tree/home/vagrant/.ssh"
install -m 600 "$vagrant_pub" "$tree/home/vagrant/.ssh/authorized_keys"
in_tree chown -R vagrant:vagrant /home/vagrant/.ssh
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$tree/etc/sudoers.d/vagrant"
chmod 440 "$tree/etc/sudoers.d/vagrant"
# No DNS lookup of the client on every login: slow under software emulation.
printf 'UseDNS no\n' >"$tree/etc/ssh/sshd_config.d/vagrant.conf"
# Every VM gets host keys and a machine id of its own at first boot, not the box's.
rm -f "$tree"/etc/ssh/ssh_host_*
cat >"$tree/etc/systemd/system/ssh-host-keys.service" <<'EOF'
# Written by vagrant/build-box.sh: host keys of this VM's own, made at its first boot.
[Unit]
Description=Generate SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
# ECDSA and Ed25519 only: an RSA key takes a minute to make under software emulation.
ExecStart=/usr/bin/ssh-keygen -q -t ecdsa -N "" -f /etc/ssh/ssh_host_ecdsa_key
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=multi-user.target
EOF
in_tree systemctl enable -q ssh-host-keys.service ssh.service
# pip without byte-compiling what it installs: Python compiles a module when it is first
# imported anyway, and compiling all of pip, setuptools and lbctl's dependencies up front is
# most of a venv's set-up time under software emulation (minutes per VM).
printf '# Written by vagrant/build-box.sh.\n[install]\ncompile = false\n' >"$tree/etc/pip.conf"
# lbctl starts BIRD and etcd itself, per agent or test: the distribution's own instances would
# only take a small VM's CPU and memory (enabled again with systemctl enable, if wanted).
in_tree systemctl disable -q bird.service etcd.service 2>/dev/null || true
# Periodic jobs that would hold apt's lock or the CPU while Vagrant provisions a lab VM.
in_tree systemctl mask -q apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer \
    e2scrub_reap.service 2>/dev/null || true
: >"$tree/etc/machine-id"
rm -f "$tree/var/lib/dbus/machine-id"
echo lbctl-box >"$tree/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tlbctl-box\n' >"$tree/etc/hosts"
# The first NIC is the provider's management network (DHCP); Vagrant adds the lab NICs.
cat >"$tree/etc/network/interfaces" <<'EOF'
# Written by vagrant/build-box.sh; Vagrant appends the private networks below.
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
root_uuid=$(cat /proc/sys/kernel/random/uuid)
echo "UUID=$root_uuid / ext4 errors=remount-ro 0 1" >"$tree/etc/fstab"
# eth0..ethN in the order of the VM's NICs, as Vagrant and run-demo.sh expect management first.
cmdline="root=UUID=$root_uuid ro console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0"
mkdir -p "$tree/boot/grub/i386-pc"
cp "$tree"/usr/lib/grub/i386-pc/*.mod "$tree"/usr/lib/grub/i386-pc/*.lst "$tree/boot/grub/i386-pc/"
# /vmlinuz and /initrd.img follow kernel upgrades inside the VM.
cat >"$tree/boot/grub/grub.cfg" <<EOF
# Written by vagrant/build-box.sh.
set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian GNU/Linux 12 (lbctl box)' {
    linux /vmlinuz $cmdline
    initrd /initrd.img
}
EOF
if [ ! -e "$tree/vmlinuz" ] || [ ! -e "$tree/initrd.img" ]; then die "the tree has no /vmlinuz or /initrd.img link"; fi
# -- 4. lbctl's venv, made by provisioning's own script at the build host's speed
# Provisioning runs `bash lbctl/setup.sh` in each VM; under software emulation making its
# venv (ensurepip, then pip resolving, fetching and unpacking lbctl's dependencies over TLS)
# is most of a VM's provisioning time. `setup.sh venv` does that part here, in the tree, at
# the path the Vagrantfile syncs the repository to: setup.sh in the VM then finds the venv
# (bcc imports) and its stamp for this pyproject.toml, and only links lbctl onto the PATH.
# Vagrant's rsync leaves .venv/, *.egg-info/ and the compiled *.so alone (excluded); the sources
# are the synced ones.
step "lbctl's venv in $guest_repo/.venv (bash lbctl/setup.sh venv)"
rm -rf "${tree:?}$guest_repo"
mkdir -p "$tree$guest_repo"
rsync -a --exclude=.git/ --exclude=.venv/ --exclude=.vagrant/ --exclude='*.egg-info/' \
    --exclude='*.so' --exclude=build/ \
    --exclude=__pycache__/ --exclude=.pytest_cache/ --exclude=.ruff_cache/ --exclude=.mypy_cache/ \
    "$repo/" "$tree$guest_repo/"
in_tree PIP_NO_CACHE_DIR=1 bash "$guest_repo/lbctl/setup.sh" venv >"$out/venv.log" 2>&1 \
    || { tail -n 20 "$out/venv.log" >&2; die "lbctl/setup.sh venv in the tree failed (log: $out/venv.log)"; }
# Byte-compiled here in seconds rather than on first import in each VM (pip does not, per
# /etc/pip.conf, as compiling in the VM is what costs minutes there).
in_tree "$guest_repo/.venv/bin/python" -m compileall -q -j 0 "$guest_repo/.venv/lib" >>"$out/venv.log" 2>&1 || true
# Only the venv and the editable install's metadata stay; the VM gets the sources by rsync.
find "$tree$guest_repo" -mindepth 1 -maxdepth 1 ! -name .venv ! -name '*.egg-info' -exec rm -rf {} +
say "      $(in_tree "$guest_repo/.venv/bin/python" -m pip list --local --format=freeze --disable-pip-version-check 2>/dev/null | wc -l) Python packages in the venv ($(du -sh "$tree$guest_repo/.venv" | cut -f1))"

rm -f "$tree/etc/resolv.conf"
cleanup
trap - EXIT
mounted=()

# -- 5. the root filesystem, written into the disk image at the partition's offset
step "root filesystem (mkfs.ext4 -d) on a ${disk_gb} GiB disk"
part_start=2048 # sectors: 1 MiB, room for GRUB's core image before it
total_sectors=$((disk_gb * 1024 * 1024 * 2))
part_sectors=$((total_sectors - part_start))
rm -f "$disk"
truncate -s "${disk_gb}G" "$disk"
mkfs.ext4 -q -F -L lbctl-root -U "$root_uuid" -E "offset=$((part_start * 512))" -d "$tree" \
    "$disk" "$((part_sectors / 2))k" || die "mkfs.ext4 -d failed"

# -- 6. the boot sectors: GRUB's boot.img, an MBR with one bootable Linux partition, core.img
step "GRUB in the boot sectors"
in_tree grub-mkimage -O i386-pc -o /tmp/core.img -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal linux configfile serial terminal echo test
core_bytes=$(stat -c %s "$tree/tmp/core.img")
[ "$core_bytes" -lt $(((part_start - 1) * 512)) ] || die "GRUB's core image ($core_bytes bytes) does not fit before the partition"
dd if="$tree/usr/lib/grub/i386-pc/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $(($1 >> 8 & 255)) $(($1 >> 16 & 255)) $(($1 >> 24 & 255)); }
# Partition 1: active, type 0x83, CHS fields saturated (LBA is what counts).
# shellcheck disable=SC2059 # the format is the entry's bytes, built from escapes
printf "\\x80\\xfe\\xff\\xff\\x83\\xfe\\xff\\xff$(le32 $part_start)$(le32 $part_sectors)" \
    | dd of="$disk" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$disk" bs=1 seek=510 conv=notrunc status=none
dd if="$tree/tmp/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
rm -f "$tree/tmp/core.img"

# -- 7. the qcow2 image
step "qcow2 image"
qemu-img convert -O qcow2 "$disk" "$out/box.img"
rm -f "$disk"

# -- 8. the box, registered with Vagrant
step "packing and registering $BOX_NAME"
cat >"$out/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $disk_gb}
EOF
cat >"$out/Vagrantfile" <<'EOF'
# The lbctl/bookworm64 box's defaults (written by vagrant/build-box.sh).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
    lv.nic_model_type = "virtio"
  end
end
EOF
# Not compressed: the qcow2 is sparse already and gzip would cost minutes each way.
tar -C "$out" -cf "$box_file.tmp" metadata.json Vagrantfile box.img
mv "$box_file.tmp" "$box_file"
rm -f "$out/box.img"
vagrant box add --force --name "$BOX_NAME" --provider libvirt "$box_file" >"$out/box-add.log" 2>&1 \
    || { tail -n 20 "$out/box-add.log" >&2; die "vagrant box add failed"; }
rm -f "$out"/registered-*
touch "$stamp"
say "done in $(( $(date +%s) - t0 )) s: $BOX_NAME (libvirt, kernel $kver, $(du -h "$box_file" | cut -f1) packed)"
say "use it: cd vagrant && LBCTL_BOX=$BOX_NAME vagrant up --provider=libvirt   (or: make vagrant-up)"
