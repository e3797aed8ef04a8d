"""The demo: build the namespace lab, balance real HTTP and UDP through the XDP program with
the same lbctl commands a user types, show where the traffic went, then clean up."""
from __future__ import annotations

import shlex
import subprocess
import sys
from collections import Counter
from typing import TYPE_CHECKING

import yaml  # type: ignore[import-untyped]
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lbctl.errors import LbctlError
from lbctl.lab import Lab, need_root

if TYPE_CHECKING:
    from lbctl.lab_cluster import ClusterLab

console = Console(highlight=False)


class DemoError(LbctlError):
    exit_code = 1


def lbctl(netns: str, *args: str, show: bool = True) -> str:
    """Runs one lbctl command in a child process, exactly as a user would type it."""
    argv = [sys.executable, "-m", "lbctl", "-n", netns, *args]
    if show:
        # escape: an IPv6 endpoint "[fd77::10]:80" would otherwise read as a markup tag.
        console.print(f"[bold cyan]$ lbctl -n {netns} {escape(shlex.join(args))}[/]")
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise DemoError(f"'lbctl {' '.join(args)}' failed: {proc.stderr.strip() or proc.stdout.strip()}")
    if show and proc.stdout.strip():
        console.print(proc.stdout.rstrip(), markup=False)
    return proc.stdout


def distribution_table(title: str, counts: Counter, names: list[str], total: int) -> Table:
    # A heading line, not a table title: rich wraps titles to the table's narrow width.
    console.print(f"[bold]{escape(title)}[/]")
    table = Table()
    table.add_column("backend")
    table.add_column("requests", justify="right")
    table.add_column("share", justify="right")
    for name in names:
        n = counts.get(name, 0)
        table.add_row(name, str(n), f"{n / total:.1%}" if total else "-")
    return table


def run_demo(keep: bool = False, count: int = 300, mode: str | None = None, prefix: str = "lbl") -> bool:
    """Returns whether every check the demo shows held (spread over all, none to a removed one).
    mode None attaches as a user would without --mode: each interface in its driver's faster
    mode (tc on the lab's veths)."""
    need_root("demo")  # before anything is built: a half-built lab would need root to remove
    lab = Lab(prefix)
    ns = lab.lb.netns
    vip = f"{lab.vip}:{lab.http_port}"
    udp_vip = f"{lab.vip}:{lab.udp_port}"
    names = [b.name for b in lab.backends]
    try:
        with console.status("building the namespace lab (client, balancer, 3 backends)..."):
            lab.up()
        console.print(f"[green]lab up[/]: client {lab.client.addr} -> balancer {ns} "
                      f"({', '.join(lab.lb_ifaces)}) -> backends "
                      f"{', '.join(f'{b.name}={b.addr}' for b in lab.backends)}; VIP {lab.vip}"
                      + (f" and {lab.vip6}" if lab.vip6 else ""))
        lbctl(ns, "attach", *lab.lb_ifaces, *(["--mode", mode] if mode else []))
        lbctl(ns, "vip", "add", vip)
        for b in lab.backends:
            lbctl(ns, "backend", "add", vip, f"{b.addr}:{lab.http_port}")
        lbctl(ns, "vip", "add", udp_vip, "--proto", "udp")
        for b in lab.backends:
            lbctl(ns, "backend", "add", udp_vip, f"{b.addr}:{lab.udp_port}", "--proto", "udp", show=False)
        console.print(f"(and the same 3 backends behind UDP VIP {udp_vip})")

        with console.status(f"{count} HTTP requests to {vip}, each on a new connection..."):
            bodies = lab.http_get(lab.vip, lab.http_port, count=count, new_connection=True)
        before = Counter(bodies)
        console.print(distribution_table(f"{count} new connections to {vip}", before, names, count))

        replies = lab.udp_echo(lab.vip, lab.udp_port, "hello", count=9)
        udp_counts = Counter(r.split(" ", 1)[0] for r in replies)
        console.print(f"UDP echo through {udp_vip}: 9 datagrams answered by "
                      + ", ".join(f"{n} x{udp_counts.get(n, 0)}" for n in names))

        v6_spread = True
        if lab.vip6 is not None:
            v6_spread = _ipv6_vip(lab, ns, count)
        elif lab.ipv6_missing:
            console.print("(no IPv6 VIP: this kernel runs without IPv6, booted with ipv6.disable=1)")

        lbctl(ns, "stats")

        gone = lab.backends[1]
        lbctl(ns, "backend", "del", vip, f"{gone.addr}:{lab.http_port}")
        with console.status(f"{count} more new connections..."):
            bodies = lab.http_get(lab.vip, lab.http_port, count=count, new_connection=True)
        after = Counter(bodies)
        console.print(distribution_table(f"after 'backend del' of {gone.name}", after, names, count))
        verdict = "[green]no new connection reached it[/]" if after.get(gone.name, 0) == 0 else \
            f"[red]{after[gone.name]} connections still reached it[/]"
        console.print(f"{gone.name}: {verdict}")
        return all(before.get(n, 0) > 0 for n in names) and after.get(gone.name, 0) == 0 and v6_spread
    finally:
        if keep:
            down = "lbctl lab down" + ("" if prefix == "lbl" else f" --prefix {prefix}")
            console.print(f"lab left up; try: lbctl -n {ns} stats; remove it with: {down}")
        else:
            with console.status("cleaning up..."):
                try:
                    lbctl(ns, "detach", "--all", "--purge", "--force", show=False)
                except (DemoError, subprocess.SubprocessError):
                    pass
                lab.down()
            console.print("cleaned up: lab removed, balancer detached")


def _ipv6_vip(lab: Lab, ns: str, count: int) -> bool:
    """The same backends behind an IPv6 VIP (NAT66: the balancer rewrites the destination,
    the backends see the client's own IPv6 address). Returns whether all of them got some."""
    assert lab.vip6 is not None
    vip6 = f"[{lab.vip6}]:{lab.http_port}"
    backends = [b for b in lab.backends if b.addr6]  # a topology may leave some IPv4 only
    names = [b.name for b in backends]
    lbctl(ns, "vip", "add", vip6)
    for b in backends:
        lbctl(ns, "backend", "add", vip6, f"[{b.addr6}]:{lab.http_port}")
    with console.status(f"{count} HTTP requests to {vip6}, each on a new connection..."):
        results = lab.http_requests(lab.vip6, lab.http_port, count=count, new_connection=True)
    failed = [r for r in results if not r.ok]
    if failed:
        raise DemoError(f"{len(failed)} of {count} IPv6 requests to {vip6} failed; first: "
                        f"{failed[0].error or f'status {failed[0].status}'}")
    spread = Counter((r.body or "").strip() for r in results)
    console.print(distribution_table(f"{count} new IPv6 connections to {vip6}", spread, names, count))
    seen = sorted({(r.client_addr or "").rsplit(":", 1)[0] for r in results})
    console.print(f"the backends saw the client as {', '.join(seen)} (NAT66 keeps the client's address)")
    return all(spread.get(n, 0) > 0 for n in names)


def _push_reaches_every_node(lab: ClusterLab) -> bool:
    """One `cluster push` drains a backend: every node applies the revision and new
    connections, whichever node the router picks, stop reaching it."""
    with console.status(f"waiting for {lab.nodes[0].name} to come back (link up, BGP, checks)..."):
        lab.wait_route(len(lab.nodes), timeout_s=90.0)
    doc = lab.node_config(lab.nodes[0])
    drained = doc["vips"][0]["backends"][-1]
    drained["state"] = "drain"
    name = lab.backends[-1].name
    console.print(f"[bold]one push for every node: {name} ({drained['addr']}) drained[/]")
    path = lab.run_dir / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    lbctl(lab.router.netns, "cluster", "push", "-f", str(path), "--etcd", str(lab.etcd_url_here))
    revision = lab.cluster_status()["latest_revision"]
    with console.status(f"waiting for every node to apply revision {revision}..."):
        lab.wait_revision(revision)
    lbctl(lab.router.netns, "cluster", "status", "--etcd", str(lab.etcd_url_here))
    bodies = lab.http_get(lab.vip, lab.http_port, count=60, new_connection=True)
    console.print(distribution_table(f"60 new connections after revision {revision}", Counter(bodies),
                                     [b.name for b in lab.backends], 60))
    return len(bodies) == 60 and name not in bodies


def run_cluster_demo(nodes: int = 2, keep: bool = False, prefix: str = "lbl", connections: int = 60) -> bool:
    """`lbctl demo --nodes N`: N balancer nodes announce the VIP over BGP, the router spreads
    connections over them (ECMP), node 1's link goes down, and the long-lived connections carry
    on through the others; then one `cluster push` reaches every node. Returns whether the
    checks it shows held."""
    from lbctl.lab_cluster import ClusterLab, LongConnections

    need_root("demo")
    lab = ClusterLab(prefix, nodes)
    vip = f"{lab.vip}:{lab.http_port}"
    first = lab.nodes[0]
    try:
        with console.status(f"building the lab: router (BIRD, ECMP), {nodes} nodes with agents "
                            "(compiles the XDP program once per node)..."):
            lab.up()
        console.print(f"[green]lab up[/]: client {lab.client.addr} -> router {lab.router_addr} -> nodes "
                      f"{', '.join(f'{n.name}={n.addr}' for n in lab.nodes)} ({lab.forwarding}) -> backends "
                      f"{', '.join(f'{b.name}={b.addr}' for b in lab.backends)}; VIP {vip}")
        console.print(f"[bold cyan]$ ip -n {lab.router.netns} route show {lab.vip}[/]")
        console.print(lab.run(lab.router, ["ip", "route", "show", lab.vip]).stdout.rstrip(), markup=False)
        lbctl(first.netns, "status")
        console.print(f"every node's agent follows one document in etcd ({lab.etcd_url}):")
        lbctl(lab.router.netns, "cluster", "status", "--etcd", str(lab.etcd_url_here))

        held = LongConnections(lab, connections, interval_s=0.1, duration_s=10.0)
        try:
            ports = held.ports()
            carried = {n.name: lab.flow_ports(n) & set(ports) for n in lab.nodes}
            table = Table()
            table.add_column("node")
            table.add_column("connections", justify="right")
            for n in lab.nodes:
                table.add_row(n.name, str(len(carried[n.name])))
            console.print(f"[bold]{connections} long-lived connections (a request every 100 ms), "
                          "by the node the router sent them to[/]")
            console.print(table)
            console.print(f"[bold cyan]$ ip -n {first.netns} link set eth0 down[/]   # node 1 fails")
            lab.run(first, ["ip", "link", "set", "eth0", "down"], check=True)
            with console.status("waiting for the router to drop node 1 (hold timer)..."):
                took = lab.wait_route(nodes - 1)
            console.print(f"the router dropped {first.name} {took:.1f} s later:")
            console.print(lab.run(lab.router, ["ip", "route", "show", lab.vip]).stdout.rstrip(), markup=False)
            bodies = lab.http_get(lab.vip, lab.http_port, count=100, new_connection=True)
            names = [b.name for b in lab.backends]
            console.print(distribution_table("100 new connections after the failure", Counter(bodies), names, 100))
            with console.status("the long-lived connections run to their end..."):
                conns = held.result()
        finally:
            held.close()
            lab.run(first, ["ip", "link", "set", "eth0", "up"])
        table = Table()
        for col in ("node at the start", "connections", "carried on", "broken", "backend changed"):
            table.add_column(col, justify="right" if col != "node at the start" else "left")
        ok_all = True
        for n in lab.nodes:
            mine = [r for r in conns if r["port"] in carried[n.name]]
            kept = [r for r in mine if r["errors"] == 0 and len(r["backends"]) == 1]
            table.add_row(n.name, str(len(mine)), str(len(kept)), str(sum(r["errors"] > 0 for r in mine)),
                          str(sum(len(r["backends"]) > 1 for r in mine)))
            if n is not first or lab.forwarding == "dsr":
                ok_all = ok_all and len(kept) == len(mine)
        console.print("[bold]the long-lived connections[/]")
        console.print(table)
        if lab.forwarding != "dsr":
            console.print(f"({lab.forwarding}: the node that takes over rewrites the source to its own "
                          "address, so the backend resets connections that moved; see docs/scale-out.md)")
        return ok_all and len(bodies) == 100 and _push_reaches_every_node(lab)
    finally:
        if keep:
            down = "lbctl lab down" + ("" if prefix == "lbl" else f" --prefix {prefix}")
            console.print(f"lab left up; try: lbctl -n {first.netns} status; remove it with: {down}")
        else:
            with console.status("cleaning up..."):
                lab.down()
            console.print("cleaned up: lab, agents, BIRD and etcd removed")
