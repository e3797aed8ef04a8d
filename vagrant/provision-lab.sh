#!/usr/bin/env bash
# A Vagrant VM's lab role, after lbctl/setup.sh has installed lbctl: forwarding on the
# balancer, routes through it on the others, the lab server as a systemd service on backends.
#
# The Vagrantfile passes what lbctl/lab_topology.yaml says about this VM:
#   LAB_ROLE       balancer | client | backend
#   LAB_NAME       the topology's host name; a backend's server answers with it ("be1")
#   LAB_GATEWAY    the balancer's address on this VM's lab network (client and backends)
#   LAB_ROUTES     space-separated destinations to route through LAB_GATEWAY
#   LAB_HTTP_PORT, LAB_UDP_PORT   the backend server's ports
#   LBCTL_REPO     the repository inside the VM
# Idempotent: Vagrant runs it on every `vagrant up` and `vagrant reload`.
set -euo pipefail

role=${LAB_ROLE:?LAB_ROLE is not set}
name=${LAB_NAME:?LAB_NAME is not set}
gateway=${LAB_GATEWAY:-}
routes=${LAB_ROUTES:-}
repo=${LBCTL_REPO:-/srv/lbctl}
# Tests point these at a scratch directory instead of the VM's /etc.
sysctl_dir=${LAB_SYSCTL_DIR:-/etc/sysctl.d}
unit_dir=${LAB_UNIT_DIR:-/etc/systemd/system}

say() { printf 'lab: %s\n' "$*"; }
die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

write() { printf '%s\n' "$2" >"$1"; }

setup_balancer() {
    # The balancer forwards by the kernel's FIB: XDP hands the first packet of a flow to an
    # unresolved neighbour to the kernel, which must be allowed to forward it.
    write "$sysctl_dir/60-lbctl-lab.conf" "net.ipv4.ip_forward = 1"
    sysctl -q -p "$sysctl_dir/60-lbctl-lab.conf"
    say "$name: IPv4 forwarding on"
}

setup_routes() {
    [ -n "$routes" ] || return 0
    [ -n "$gateway" ] || die "$name: LAB_ROUTES set but no LAB_GATEWAY"
    local ip_bin dest exec_lines=""
    ip_bin=$(command -v ip) || die "ip not found (iproute2)"
    for dest in $routes; do
        exec_lines+="ExecStart=$ip_bin route replace $dest via $gateway"$'\n'
    done
    # The default route stays on the management NIC (package downloads, SSH); only the lab's
    # addresses go through the balancer. A unit, so the routes come back after a reboot.
    write "$unit_dir/lbctl-lab-routes.service" "# Written by vagrant/provision-lab.sh.
[Unit]
Description=lbctl lab: routes to the VIP and the other lab network through the balancer
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
${exec_lines}Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target"
    systemctl daemon-reload
    systemctl enable -q lbctl-lab-routes.service
    systemctl restart lbctl-lab-routes.service
    say "$name: routes via $gateway to $routes"
}

setup_backend() {
    local http_port=${LAB_HTTP_PORT:?LAB_HTTP_PORT is not set}
    local udp_port=${LAB_UDP_PORT:?LAB_UDP_PORT is not set}
    local python="$repo/.venv/bin/python"
    [ -x "$python" ] || die "$python missing: lbctl/setup.sh must run first"
    write "$unit_dir/lbctl-labserver.service" "# Written by vagrant/provision-lab.sh.
[Unit]
Description=lbctl lab backend $name (HTTP :$http_port, UDP echo :$udp_port)
Wants=network-online.target
After=network-online.target

[Service]
ExecStart=$python -m lbctl.labserver --name $name --http-port $http_port --udp-port $udp_port
DynamicUser=yes
AmbientCapabilities=CAP_NET_BIND_SERVICE
# The synced repository is not this user's to write: no bytecode caches.
Environment=PYTHONDONTWRITEBYTECODE=1
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target"
    systemctl daemon-reload
    systemctl enable -q lbctl-labserver.service
    # Restart even when unchanged: a re-sync may have brought new server code.
    systemctl restart lbctl-labserver.service
    local _
    for _ in $(seq 50); do
        if [ -n "$(ss -Hltn "sport = :$http_port")" ]; then
            say "$name: lbctl-labserver listens on :$http_port (HTTP) and :$udp_port (UDP)"
            return 0
        fi
        sleep 0.2
    done
    systemctl --no-pager status lbctl-labserver.service >&2 || true
    die "$name: lbctl-labserver is not listening on :$http_port after 10 s"
}

case "$role" in
    balancer) setup_balancer ;;
    client) setup_routes ;;
    backend) setup_routes; setup_backend ;;
    *) die "unknown LAB_ROLE '$role'; expected balancer, client or backend" ;;
esac
