"""The peers' configuration files for the bench lab: nginx on each backend, HAProxy mode tcp and
nftables DNAT on the balancer, each balancing the same VIP ports to the same backends."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lbctl.bench.spec import (
    BULK_PORT,
    HTTP_VIP_PORT,
    NGINX_PORT,
    PPS_PORT,
    SINGLE_NGINX_PORT,
    SINGLE_VIP_PORT,
)


def nginx_conf(name: str, run_dir: Path, ipv6: bool = False) -> str:
    """`ipv6`: listen on IPv6 too (the namespace must have IPv6 on, or nginx cannot bind)."""
    listen6 = (f"\n        listen [::]:{NGINX_PORT} reuseport backlog=4096;"
               f"\n        listen [::]:{SINGLE_NGINX_PORT} reuseport backlog=4096;" if ipv6 else "")
    return f"""# nginx for backend {name} of the lbctl benchmark lab
daemon off;
worker_processes 1;
pid {run_dir}/nginx-{name}.pid;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {run_dir}/nginx-{name}-tmp;
    proxy_temp_path {run_dir}/nginx-{name}-tmp;
    fastcgi_temp_path {run_dir}/nginx-{name}-tmp;
    uwsgi_temp_path {run_dir}/nginx-{name}-tmp;
    scgi_temp_path {run_dir}/nginx-{name}-tmp;
    server {{
        listen {NGINX_PORT} reuseport backlog=4096;
        listen {SINGLE_NGINX_PORT} reuseport backlog=4096;{listen6}
        location / {{ return 200 "{name}\\n"; }}
    }}
}}
"""


def haproxy_conf(vip: str, backends: Sequence[str]) -> str:
    servers = "\n".join(f"    server be{i + 1} {a}:{NGINX_PORT}" for i, a in enumerate(backends))
    return f"""# HAProxy mode tcp for the lbctl benchmark lab
global
    maxconn 8000
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend web
    bind {vip}:{HTTP_VIP_PORT}
    default_backend web
backend web
    balance roundrobin
{servers}
listen single
    bind {vip}:{SINGLE_VIP_PORT}
    server be1 {backends[0]}:{NGINX_PORT}
listen bulk
    bind {vip}:{BULK_PORT}
    server be1 {backends[0]}:{BULK_PORT}
"""


def nft_ruleset(vip: str, backends: Sequence[str]) -> str:
    http_map = ", ".join(f"{i} : {a} . {NGINX_PORT}" for i, a in enumerate(backends))
    udp_map = ", ".join(f"{i} : {a}" for i, a in enumerate(backends))
    n = len(backends)
    return f"""# nftables DNAT for the lbctl benchmark lab: conntrack un-NATs the replies
table ip lbbench {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {vip} tcp dport {HTTP_VIP_PORT} dnat ip to numgen inc mod {n} map {{ {http_map} }}
        ip daddr {vip} tcp dport {SINGLE_VIP_PORT} dnat ip to {backends[0]}:{NGINX_PORT}
        ip daddr {vip} tcp dport {BULK_PORT} dnat ip to {backends[0]}:{BULK_PORT}
        ip daddr {vip} udp dport {PPS_PORT} dnat ip to numgen inc mod {n} map {{ {udp_map} }}
    }}
}}
"""
