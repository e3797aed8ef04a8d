#!/usr/bin/env bash
# The lbctl demo across the Vagrant lab's VMs, run on the host after `vagrant up`: attach on
# lb's two lab NICs, add the VIP and the backends, send requests from client, print where
# they went; then remove a backend, show new connections avoid it, and clean up.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash vagrant/run-demo.sh [--count N] [--mode native|generic] [--keep]
  --count N     HTTP requests per round, each on a new TCP connection (default 300)
  --mode MODE   XDP mode for `lbctl attach`; by default native, falling back to generic
                when the NIC's driver refuses native mode
  --keep        leave the balancer attached and configured at the end
examples:
  bash vagrant/run-demo.sh                  # the whole demo, then clean up
  bash vagrant/run-demo.sh --mode generic   # skip native mode (e.g. an e1000 NIC)
  bash vagrant/run-demo.sh --keep           # then: vagrant ssh lb -c 'sudo lbctl stats'
EOF
}

say() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
guest_repo=/srv/lbctl                          # GUEST_REPO in vagrant/Vagrantfile
guest_python="$guest_repo/.venv/bin/python"    # made by lbctl/setup.sh in every VM
guest_helper="$guest_repo/vagrant/lab_guest.py"
count=300
mode=""
keep=0

while [ $# -gt 0 ]; do
    case "$1" in
        --count) [ $# -ge 2 ] || die "--count needs a number"; count=$2; shift 2 ;;
        --mode) [ $# -ge 2 ] || die "--mode needs native or generic"; mode=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument '$1'" ;;
    esac
done
[[ "$count" =~ ^[1-9][0-9]*$ ]] || die "--count must be a positive number, not '$count'"
case "$mode" in ""|native|generic) ;; *) die "--mode must be native or generic, not '$mode'" ;; esac

command -v vagrant >/dev/null || die "vagrant not found; hint: see vagrant/README.md"
cd "$here" # vagrant finds the lab's Vagrantfile from here

# One shell command on one VM. Each `vagrant ssh` costs a second or more, so callers batch.
on() {
    vagrant ssh --no-tty -c "$2" "$1" </dev/null
}

# lbctl commands on lb in one session, each shown as a user would type it; stops at the
# first that fails. Arguments are whole commands built from topology values (addresses,
# ports, checked names), which need no quoting.
lb_lbctl() {
    local script="set -e" cmd
    for cmd in "$@"; do
        script+="; echo 'lb\$ lbctl $cmd'; sudo lbctl $cmd"
    done
    on lb "$script"
}

# The interface holding address $1, from `ip -o -4 addr show` lines on stdin. VMs name
# their NICs themselves (eth1, ens6, ...), so the lab's are found by address.
iface_holding() {
    awk -v addr="$1" '$3 == "inet" {
        split($4, a, "/")
        if (a[1] == addr) { sub(/@.*/, "", $2); print $2; exit }
    }'
}

# The distribution table for one round: $1 title, $2 one line per request.
distribution() {
    printf '%s\n' "$1"
    LC_ALL=C awk -v names="${backend_names[*]}" -v total="$count" '
        { seen[$0]++ }
        END {
            printf " %-9s %8s %7s\n", "backend", "requests", "share"
            n = split(names, name, " ")
            for (i = 1; i <= n; i++) {
                c = seen[name[i]] + 0
                answered += c
                printf " %-9s %8d %6.1f%%\n", name[i], c, 100 * c / total
            }
            if (answered < total) printf " %-9s %8d %6.1f%%\n", "failed", total - answered,
                100 * (total - answered) / total
        }' <<<"$2"
    grep -m1 '^error:' <<<"$2" | sed 's/^/ first failure: /' || true
}

answered_by() { grep -cxF -- "$1" <<<"$2" || true; }

# -- what the lab looks like, from the topology file the VMs were provisioned from
say "reading the lab topology on lb"
topology=$(on lb "$guest_python $guest_helper topology") \
    || die "cannot run the demo helper on lb; is the lab up and provisioned? hint: (cd vagrant && vagrant up)"
vip="" http_port="" udp_port="" client_addr="" lb_client_addr="" lb_backend_addr=""
backend_names=()
backend_addrs=()
while read -r key first second; do
    case "$key" in
        vip) vip=$first ;;
        http_port) http_port=$first ;;
        udp_port) udp_port=$first ;;
        client_addr) client_addr=$first ;;
        lb_client_addr) lb_client_addr=$first ;;
        lb_backend_addr) lb_backend_addr=$first ;;
        backend) backend_names+=("$first"); backend_addrs+=("$second") ;;
    esac
done <<<"$topology"
for v in vip http_port udp_port client_addr lb_client_addr lb_backend_addr; do
    [ -n "${!v}" ] || die "the topology on lb gave no $v"
done
[ ${#backend_names[@]} -ge 2 ] || die "the demo needs at least two backends, the topology has ${#backend_names[@]}"

# -- lb's lab interfaces, never its management NIC (the one with the default route)
lb_ip=$(on lb "ip -o -4 addr show; ip -o route show default")
client_if=$(iface_holding "$lb_client_addr" <<<"$lb_ip")
backend_if=$(iface_holding "$lb_backend_addr" <<<"$lb_ip")
mgmt_if=$(awk '$1 == "default" { for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }' <<<"$lb_ip")
[ -n "$client_if" ] || die "no interface on lb holds $lb_client_addr; hint: vagrant reload lb"
[ -n "$backend_if" ] || die "no interface on lb holds $lb_backend_addr; hint: vagrant reload lb"
for ifname in "$client_if" "$backend_if"; do
    [[ "$ifname" =~ ^[A-Za-z0-9_.-]+$ ]] || die "unexpected interface name '$ifname' on lb"
    [ "$ifname" != "$mgmt_if" ] || die "$ifname on lb carries the default route (management NIC); refusing to attach there"
done
[ "$client_if" != "$backend_if" ] || die "$lb_client_addr and $lb_backend_addr are both on $client_if; two-arm NAT needs two interfaces"

backend_list=""
for i in "${!backend_names[@]}"; do backend_list+=" ${backend_names[$i]}=${backend_addrs[$i]}"; done
say "client $client_addr -> lb ($client_if $lb_client_addr | $backend_if $lb_backend_addr) ->$backend_list; VIP $vip"

# -- attach: from a clean slate, so the demo can run again
attached=0
cleanup() {
    if [ "$attached" = 1 ] && [ "$keep" = 0 ]; then
        if on lb "sudo lbctl detach --all --purge --force" >/dev/null 2>&1; then
            say "cleaned up: balancer detached, maps removed"
        else
            say "clean-up failed; run: vagrant ssh lb -c 'sudo lbctl detach --all --purge --force'"
        fi
    fi
}
trap cleanup EXIT
on lb "sudo lbctl detach --all --purge --force >/dev/null 2>&1 || true"
attached=1
rc=0
lb_lbctl "attach $client_if $backend_if --mode ${mode:-native}" || rc=$?
if [ "$rc" = 3 ] && [ -z "$mode" ]; then
    # Exit 3: the driver refused the mode (e.g. VirtualBox's e1000 has no native XDP).
    say "native XDP refused on lb's NICs; using generic mode (docs/real-hosts.md explains)"
    rc=0
    lb_lbctl "attach $client_if $backend_if --mode generic" || rc=$?
fi
[ "$rc" = 0 ] || die "lbctl attach failed on lb (exit $rc)"

# -- the VIP (TCP and UDP) and its backends
vip_http="$vip:$http_port"
vip_udp="$vip:$udp_port"
cmds=("vip add $vip_http")
for addr in "${backend_addrs[@]}"; do cmds+=("backend add $vip_http $addr:$http_port"); done
cmds+=("vip add $vip_udp --proto udp")
for addr in "${backend_addrs[@]}"; do cmds+=("backend add $vip_udp $addr:$udp_port --proto udp"); done
lb_lbctl "${cmds[@]}"

# -- traffic from client
say "$count HTTP requests to $vip_http from client, each on a new connection"
before=$(on client "$guest_python $guest_helper http $vip $http_port $count")
distribution "    $count new connections to $vip_http" "$before"

udp=$(on client "$guest_python $guest_helper udp $vip $udp_port 9")
udp_summary=""
for name in "${backend_names[@]}"; do udp_summary+="${udp_summary:+, }$name x$(answered_by "$name" "$udp")"; done
say "UDP echo through $vip_udp: 9 datagrams answered by $udp_summary"

lb_lbctl "stats"

# -- remove one backend: new connections must avoid it
gone=${backend_names[1]}
lb_lbctl "backend del $vip_http ${backend_addrs[1]}:$http_port"
say "$count more new connections"
after=$(on client "$guest_python $guest_helper http $vip $http_port $count")
distribution "    after 'backend del' of $gone" "$after"

ok=1
for name in "${backend_names[@]}"; do
    [ "$(answered_by "$name" "$before")" -gt 0 ] || { ok=0; say "$name answered none of the first round"; }
done
still=$(answered_by "$gone" "$after")
if [ "$still" = 0 ]; then
    say "$gone: no new connection reached it"
else
    ok=0
    say "$gone: $still connections still reached it"
fi
[ "$keep" = 0 ] || say "balancer left attached; try: vagrant ssh lb -c 'sudo lbctl stats'"
[ "$ok" = 1 ] || die "the demo's checks failed (see above)"
