"""The `lbctl` command line: parse, call one library function, print. Errors become one line."""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import IO, TYPE_CHECKING, Any

import click

from lbctl.errors import ConfigError, NetnsError
from lbctl.model import (
    BACKEND_STATES,
    PROTO_NAMES,
    XDP_MODES,
    HostPort,
    check_weight,
    parse_host_port,
)
from xdp.errors import XdpError

if TYPE_CHECKING:
    from lbctl.control import Controller

try:
    __version__ = version("lbctl")
except PackageNotFoundError:  # running from a checkout without install
    __version__ = "0.0.0+checkout"


def examples(*lines: str) -> str:
    """Help epilogue: one example per line, each with a comment (kept unwrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


class Context:
    """What commands need: which instance, and a factory for its controller (tests inject one)."""

    def __init__(self, instance: str, controller_factory: Callable[[str], Controller] | None = None):
        self.instance = instance
        self._factory = controller_factory
        self._controller: Controller | None = None

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            if self._factory is None:
                from lbctl.control import Controller

                self._factory = Controller
            self._controller = self._factory(self.instance)
        return self._controller


def enter_netns(name: str) -> None:
    """Switches only the network namespace (like `ip -n`), keeping the host's /sys/fs/bpf."""
    path = os.path.join("/var/run/netns", name)
    if "/" in name or not os.path.exists(path):
        raise NetnsError(f"network namespace '{name}' not found; hint: 'ip netns list' shows them")
    from pyroute2 import netns

    try:
        netns.setns(name, flags=0)
    except OSError as exc:
        raise NetnsError(f"cannot enter network namespace '{name}': {exc.strerror}; hint: run as root") from exc


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]], empty: str) -> None:
    """A fixed-column table with a header: stable for scripts (use --json to parse fully)."""
    if not rows:
        click.echo(empty)
        return
    cells = [[h for h, _ in columns]] + [[_fmt(r.get(k)) for _, k in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.1%}"
    return "-" if value is None else str(value)


def echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def echo_plan(result) -> None:
    for line in result.plan.describe():
        click.echo(line)
    for warning in result.plan.warnings:
        click.echo(f"lbctl: warning: {warning}", err=True)


# -- argument types: bad input is refused while click parses, before any command runs --------
class InputError(click.BadParameter):
    """Bad input on the command line: one line saying what was wrong, with a hint; exit 2
    like every usage error (click's own form would add the usage block around it)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"lbctl: error: {self.message}", file=file, err=file is None)


class HostPortType(click.ParamType):
    """ADDR:PORT as the model parses it; the protocol comes from --proto (HostPort.on)."""

    name = "ADDR:PORT"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> HostPort:
        if isinstance(value, HostPort):
            return value
        try:
            return parse_host_port(str(value), self.what)
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None


class WeightType(click.ParamType):
    name = "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            weight = int(value)
        except (TypeError, ValueError):
            raise InputError(f"weight '{value}' is not a whole number; hint: e.g. --weight 2",
                             ctx=ctx, param=param) from None
        try:
            return check_weight(weight)
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None


class ListenType(click.ParamType):
    """ADDR:PORT to listen on (the agent's metrics)."""

    name = "ADDR:PORT"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from lbctl.metrics import parse_listen  # noqa: PLC0415

        try:
            parse_listen(str(value))
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None
        return str(value)


VIP = HostPortType("VIP")
BACKEND = HostPortType("backend")
CLIENT = HostPortType("client")


def proto_option(f):
    return click.option("--proto", default="tcp", show_default=True, type=click.Choice(PROTO_NAMES,
                        case_sensitive=False), help="VIP protocol")(f)


def mode_option(f):
    return click.option("--mode", type=click.Choice(XDP_MODES), default=None,
                        help="XDP mode for every interface: native (in the driver) or generic "
                             "(on the socket buffer) [default: by driver: generic on veth, native "
                             "on NICs; 'lbctl status' says why]")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="print JSON")(f)


class LbctlGroup(click.Group):
    """Translates the library's typed errors into one line and a distinct exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except XdpError as exc:
            click.echo(f"lbctl: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except PermissionError as exc:
            click.echo(f"lbctl: error: {exc}; hint: run as root", err=True)
            sys.exit(77)


@click.group("lbctl", cls=LbctlGroup, epilog=examples(
    "lbctl attach eth0 eth1                            # client side and backend side",
    "lbctl vip add 10.0.0.10:80                        # a TCP VIP",
    "lbctl backend add 10.0.0.10:80 10.0.1.11:8080     # first backend",
    "lbctl stats                                       # counters",
    "lbctl -n lbl-lb status                            # the lab's balancer",
))
@click.option("-n", "--netns", metavar="NETNS", help="act inside a named network namespace, like `ip -n`")
@click.version_option(__version__, prog_name="lbctl")
@click.pass_context
def main(ctx: click.Context, netns: str | None) -> None:
    """XDP/eBPF L4 load balancer (two-arm NAT) control."""
    if isinstance(ctx.obj, Context):   # injected by tests
        return
    instance = "host"
    if netns:
        try:
            enter_netns(netns)
        except XdpError as exc:
            click.echo(f"lbctl: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        instance = netns
    ctx.obj = Context(instance)


# -- attach / detach / status ---------------------------------------------------------------
@main.command(epilog=examples(
    "lbctl attach eth0 eth1                  # both arms, each in its driver's faster mode",
    "lbctl attach eth0 --mode generic        # when the driver has no native XDP",
    "lbctl attach eth0 eth1 --mode native    # force one mode on both",
))
@click.argument("ifaces", nargs=-1, required=True)
@mode_option
@click.pass_obj
def attach(obj: Context, ifaces: tuple[str, ...], mode: str | None) -> None:
    """Load the balancer and attach it to IFACE... (compiles once; maps persist)."""
    for a in obj.controller.attach(list(ifaces), mode):
        click.echo(f"attached {a.ifname} ({a.mode}, prog {a.prog_id}): {a.reason}")
    from xdp.balancer import ipv4_forwarding

    if not ipv4_forwarding():
        click.echo("lbctl: warning: net.ipv4.ip_forward is 0 here, so VIP traffic will not be "
                   "forwarded; hint: sysctl -w net.ipv4.ip_forward=1", err=True)


@main.command(epilog=examples(
    "lbctl detach eth1                       # one interface",
    "lbctl detach --all                      # everywhere; VIPs and backends stay in the maps",
    "lbctl detach --all --purge              # and remove the maps (all configuration)",
))
@click.argument("ifaces", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="detach from every interface")
@click.option("--purge", is_flag=True, help="with --all: also remove the pinned maps")
@click.pass_obj
def detach(obj: Context, ifaces: tuple[str, ...], all_: bool, purge: bool) -> None:
    """Detach the balancer from IFACE... or --all."""
    if bool(ifaces) == all_:
        raise click.UsageError("name interfaces or give --all (not both)")
    if purge and not all_:
        raise click.UsageError("--purge goes with --all")
    done = obj.controller.detach(None if all_ else list(ifaces), purge)
    for a in done:
        click.echo(f"detached {a.ifname}")
    if not done:
        click.echo("nothing attached")
    if purge:
        click.echo("removed pinned maps")


@main.command("reload", epilog=examples(
    "lbctl reload                            # after an upgrade: the new program, same maps and flows",
    "lbctl -n lbl-lb reload",
))
@click.pass_obj
def reload_cmd(obj: Context) -> None:
    """Swap in a freshly built XDP program on every attached interface, atomically, keeping the
    pinned maps: established connections keep their backends."""
    for a in obj.controller.reload():
        click.echo(f"reloaded {a.ifname} ({a.mode}, prog {a.prog_id})")


@main.command(epilog=examples("lbctl status", "lbctl status --json"))
@json_option
@click.pass_obj
def status(obj: Context, as_json: bool) -> None:
    """Where the balancer runs and what it holds."""
    st = obj.controller.status()
    if as_json:
        echo_json(st)
        return
    click.echo(f"instance  {st['instance']}")
    click.echo(f"program   {'prog ' + str(st['prog_id']) if st['prog_id'] else 'not loaded'}")
    click.echo(f"maps      {st['pin_dir'] if st['maps'] else 'none'}")
    click.echo(f"vips      {st['vips']}")
    click.echo(f"backends  {st['backends']}")
    agent = st.get("agent")
    click.echo(f"agent     {'pid ' + str(agent['pid']) + ', ' + agent['config'] if agent else 'not running'}")
    if agent and agent["all_failing"]:
        click.echo(f"WARNING   every backend fails its checks, last healthy set kept: {', '.join(agent['all_failing'])}")
    click.echo("")
    print_table(st["attached"], [("IFACE", "ifname"), ("MODE", "mode"), ("PROG", "prog_id"),
                                 ("WHY", "why")],
                "not attached to any interface")


# -- VIPs -----------------------------------------------------------------------------------
@main.group(epilog=examples(
    "lbctl vip add 10.0.0.10:80                 # TCP",
    "lbctl vip add 10.0.0.10:53 --proto udp     # UDP",
    "lbctl vip list --json",
))
def vip() -> None:
    """Add, delete and list VIPs."""


@vip.command("add", epilog=examples("lbctl vip add 10.0.0.10:80", "lbctl vip add 10.0.0.10:53 --proto udp"))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@proto_option
@click.option("--force", is_flag=True,
              help="allow a VIP on an address and port where a local service listens")
@click.pass_obj
def vip_add(obj: Context, vip_addr: HostPort, proto: str, force: bool) -> None:
    """Add a VIP (no backends yet: its packets are dropped until one is added)."""
    echo_plan(obj.controller.vip_add(vip_addr.on(proto), force))


@vip.command("del", epilog=examples("lbctl vip del 10.0.0.10:80"))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@proto_option
@click.pass_obj
def vip_del(obj: Context, vip_addr: HostPort, proto: str) -> None:
    """Delete a VIP and its backends."""
    echo_plan(obj.controller.vip_del(vip_addr.on(proto)))


@vip.command("list", epilog=examples("lbctl vip list", "lbctl vip list --json"))
@json_option
@click.pass_obj
def vip_list(obj: Context, as_json: bool) -> None:
    """List VIPs with their counters."""
    rows = obj.controller.vips()
    if as_json:
        echo_json(rows)
        return
    print_table(rows, [("VIP", "vip"), ("PROTO", "proto"), ("BACKENDS", "backends"),
                       ("ACTIVE", "active_backends"), ("PACKETS", "packets"), ("BYTES", "bytes"),
                       ("FLOWS", "new_flows"), ("DROPS", "drops")], "no VIPs")


# -- backends -------------------------------------------------------------------------------
@main.group(epilog=examples(
    "lbctl backend add 10.0.0.10:80 10.0.1.11:8080",
    "lbctl backend add 10.0.0.10:80 10.0.1.12:8080 --weight 2",
    "lbctl backend set 10.0.0.10:80 10.0.1.12:8080 --state drain",
    "lbctl backend del 10.0.0.10:80 10.0.1.11:8080",
))
def backend() -> None:
    """Add, change, delete and list a VIP's backends (live: no recompile, no dropped flows)."""


def weight_option(default):
    return click.option("--weight", type=WeightType(), default=default, show_default=default is not None,
                        help="share of new connections, 1-1000")


@backend.command("add", epilog=examples(
    "lbctl backend add 10.0.0.10:80 10.0.1.11:8080              # weight 1",
    "lbctl backend add 10.0.0.10:80 10.0.1.12:8080 --weight 2   # twice the share",
))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@click.argument("backend_addr", metavar="ADDR:PORT", type=BACKEND)
@proto_option
@weight_option(1)
@click.pass_obj
def backend_add(obj: Context, vip_addr: HostPort, backend_addr: HostPort, proto: str, weight: int) -> None:
    """Add a backend to a VIP."""
    echo_plan(obj.controller.backend_add(vip_addr.on(proto), backend_addr.on(proto), weight))


@backend.command("del", epilog=examples("lbctl backend del 10.0.0.10:80 10.0.1.11:8080"))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@click.argument("backend_addr", metavar="ADDR:PORT", type=BACKEND)
@proto_option
@click.pass_obj
def backend_del(obj: Context, vip_addr: HostPort, backend_addr: HostPort, proto: str) -> None:
    """Remove a backend: new connections avoid it; established ones finish where they are."""
    echo_plan(obj.controller.backend_del(vip_addr.on(proto), backend_addr.on(proto)))


@backend.command("set", epilog=examples(
    "lbctl backend set 10.0.0.10:80 10.0.1.12:8080 --weight 3",
    "lbctl backend set 10.0.0.10:80 10.0.1.12:8080 --state drain   # no new flows, old ones stay",
    "lbctl backend set 10.0.0.10:80 10.0.1.12:8080 --state down    # its flows move elsewhere",
))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@click.argument("backend_addr", metavar="ADDR:PORT", type=BACKEND)
@proto_option
@weight_option(None)
@click.option("--state", type=click.Choice(BACKEND_STATES), help="backend state")
@click.pass_obj
def backend_set(obj: Context, vip_addr: HostPort, backend_addr: HostPort, proto: str, weight: int | None,
                state: str | None) -> None:
    """Change a backend's weight or state."""
    if weight is None and state is None:
        raise click.UsageError("nothing to set: give --weight and/or --state")
    echo_plan(obj.controller.backend_set(vip_addr.on(proto), backend_addr.on(proto), weight, state))


@backend.command("list", epilog=examples("lbctl backend list", "lbctl backend list 10.0.0.10:80 --json"))
@click.argument("vip_addr", metavar="[VIP:PORT]", required=False, type=VIP)
@proto_option
@json_option
@click.pass_obj
def backend_list(obj: Context, vip_addr: HostPort | None, proto: str, as_json: bool) -> None:
    """List backends (of one VIP, or all) with their counters."""
    rows = obj.controller.backends(vip_addr.on(proto) if vip_addr else None)
    if as_json:
        echo_json(rows)
        return
    print_table(rows, [("VIP", "vip"), ("PROTO", "proto"), ("BACKEND", "backend"), ("WEIGHT", "weight"),
                       ("STATE", "state"), ("HEALTH", "health"), ("SHARE", "ring_share"), ("PACKETS", "packets"),
                       ("BYTES", "bytes"), ("FLOWS", "new_flows")], "no backends")


# -- the config file ------------------------------------------------------------------------
@main.command("apply", epilog=examples(
    "lbctl apply -f /etc/lbctl/lbctl.yaml --dry-run   # what would change, ring share moved, flows touched",
    "lbctl apply -f /etc/lbctl/lbctl.yaml             # attach, then change the maps in one step",
    "lbctl -n lbl-lb apply -f lab.yaml                # inside the lab's balancer namespace",
))
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False),
              help="the config file (YAML): the whole desired state")
@click.option("--dry-run", is_flag=True, help="print the plan, change nothing")
@click.pass_obj
def apply_cmd(obj: Context, path: str, dry_run: bool) -> None:
    """Make the balancer hold what FILE says: interfaces, VIPs, backends (all or nothing)."""
    from lbctl.apply import apply_state
    from lbctl.config import load_file

    state = load_file(path)   # a broken file stops here, before the balancer is touched
    result = apply_state(obj.controller, state, dry_run)
    for line in result.describe():
        click.echo(line)
    if dry_run and not result.empty:
        click.echo("(dry run: nothing changed)")


@main.command("export", epilog=examples(
    "lbctl export > lbctl.yaml                        # the live state as a file",
    "lbctl export | lbctl apply -f /dev/stdin --dry-run   # a round trip: no changes",
))
@click.pass_obj
def export_cmd(obj: Context) -> None:
    """Print the live state (interfaces, VIPs, backends) as a file that `lbctl apply` accepts."""
    from lbctl.apply import export_text

    click.echo(export_text(obj.controller), nl=False)


@main.command("agent", epilog=examples(
    "lbctl agent -f /etc/lbctl/lbctl.yaml                      # foreground; systemd runs it so",
    "lbctl -n lbl-lb agent -f lab.yaml --metrics-addr 127.0.0.1:9811   # inside a namespace",
    "kill -HUP $(pidof -s lbctl)                               # re-read the file, apply the difference",
))
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False),
              help="the config file (YAML): the whole desired state")
@click.option("--metrics-addr", type=ListenType(), default="127.0.0.1:9810", show_default=True,
              help="ADDR:PORT for Prometheus /metrics (localhost by default)")
@click.option("--detach-on-exit", is_flag=True,
              help="detach from every interface when stopped (default: keep forwarding)")
@click.pass_obj
def agent_cmd(obj: Context, path: str, metrics_addr: str, detach_on_exit: bool) -> None:
    """Run the balancer from FILE: attach and apply, health checks, metrics, SIGHUP re-reads.

    SIGTERM stops the agent and leaves the data plane forwarding on the last applied state;
    a restarted agent finds the maps equal to the file and moves nothing."""
    from lbctl.agent import Agent, setup_logging

    setup_logging()
    sys.exit(Agent(obj.controller, path, metrics_addr, detach_on_exit, __version__).run())


# -- stats and flows ------------------------------------------------------------------------
@main.command(epilog=examples("lbctl stats", "lbctl stats --json", "lbctl stats --watch   # every second"))
@json_option
@click.option("--watch", is_flag=True, help="repeat every second until Ctrl-C")
@click.pass_obj
def stats(obj: Context, as_json: bool, watch: bool) -> None:
    """Counters: by outcome, per VIP and per backend."""
    while True:
        data = obj.controller.stats()
        if as_json:
            echo_json(data)
        else:
            if watch:
                click.clear()
            outcomes = [{"outcome": k, **v} for k, v in data["outcomes"].items()]
            print_table(outcomes, [("OUTCOME", "outcome"), ("PACKETS", "packets"), ("BYTES", "bytes")], "")
            click.echo("")
            print_table(data["vips"], [("VIP", "vip"), ("PROTO", "proto"), ("PACKETS", "packets"),
                                       ("BYTES", "bytes"), ("FLOWS", "new_flows"), ("DROPS", "drops")],
                        "no VIPs")
            click.echo("")
            print_table(data["backends"], [("VIP", "vip"), ("BACKEND", "backend"), ("STATE", "state"),
                                           ("PACKETS", "packets"), ("BYTES", "bytes"),
                                           ("FLOWS", "new_flows")], "no backends")
        if not watch:
            return
        try:
            time.sleep(1)
        except KeyboardInterrupt:
            return


@main.command(epilog=examples(
    "lbctl explain 10.0.2.5:40000 10.0.0.10:80          # which backend, and why",
    "lbctl explain 10.0.2.5:5000 10.0.0.10:53 --proto udp --json",
))
@click.argument("client_addr", metavar="CLIENT:PORT", type=CLIENT)
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@proto_option
@json_option
@click.pass_obj
def explain(obj: Context, client_addr: HostPort, vip_addr: HostPort, proto: str, as_json: bool) -> None:
    """Which backend the running balancer picks for a flow, and why (changes nothing)."""
    client, vip_ep = client_addr.on(proto), vip_addr.on(proto)
    ans = obj.controller.explain(client, vip_ep)
    if as_json:
        echo_json(ans)
        return
    flow = f"{client} -> {vip_ep} ({proto})"
    if ans["verdict"] == "not_vip":
        click.echo(f"{flow}: {vip_ep} is not a VIP here; the packet passes to the kernel untouched")
    elif ans["verdict"] == "no_backend":
        click.echo(f"{flow}: no usable backend (ring slot {ans['slot']} of generation "
                   f"{ans['ring_generation']} is empty); the packet is dropped")
    elif ans["verdict"] == "flow_hit":
        click.echo(f"{flow}: backend {ans['backend']} (id {ans['backend_id']}) by flow-table hit "
                   f"({ans['flow_state']}, tracked for {ans['flow_age_ms'] / 1000:.1f} s)")
    else:
        click.echo(f"{flow}: backend {ans['backend']} (id {ans['backend_id']}) by ring slot "
                   f"{ans['slot']} of generation {ans['ring_generation']} (new flow)")


@main.group(epilog=examples("lbctl flows list --limit 20", "lbctl flows flush"))
def flows() -> None:
    """Inspect or flush the connection-tracking table."""


@flows.command("list", epilog=examples("lbctl flows list              # first 100 flows",
                                         "lbctl flows list --json --limit 5"))
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@json_option
@click.pass_obj
def flows_list(obj: Context, limit: int, as_json: bool) -> None:
    """List tracked flows (client -> VIP -> backend)."""
    rows = obj.controller.flows(limit)
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        r["client_ep"] = f"{r['client']}:{r['client_port']}"
        r["vip_ep"] = f"{r['vip']}:{r['vip_port']}"
        r["backend_ep"] = f"{r['backend']}:{r['backend_port']}"
    print_table(rows, [("CLIENT", "client_ep"), ("VIP", "vip_ep"), ("PROTO", "proto"),
                       ("BACKEND", "backend_ep"), ("STATE", "state")], "no flows")


@flows.command("flush", epilog=examples("lbctl flows flush             # connections re-pick by the ring"))
@click.pass_obj
def flows_flush(obj: Context) -> None:
    """Forget every tracked flow (established connections re-pick by the ring)."""
    click.echo(f"flushed {obj.controller.flows_flush()} flows")


# -- benchmarks -----------------------------------------------------------------------------
# The harness lives in lbctl.bench, imported only inside these commands: the product never
# loads it otherwise. The setup names are spelled here for the same reason (a unit test
# holds them equal to lbctl.bench.spec.SETUPS).
BENCH_SETUPS = ("xdp-native", "xdp-generic", "nftables", "haproxy", "direct")


@main.group(epilog=examples("lbctl bench dataplane   # ns per packet of each XDP path",
                            "lbctl bench peers       # against nftables, HAProxy and direct"))
def bench() -> None:
    """Measure the balancer (benchmarks report; they never assert)."""


@bench.command("peers", epilog=examples(
    "lbctl bench peers --results-dir bench/results --doc docs/benchmarks.md   # 3 rounds, ~12 min",
    "lbctl bench peers --quick                    # 1 short round; JSON record in .",
    "lbctl bench peers --only xdp-native --only direct   # two setups"))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 20))
@click.option("--quick", is_flag=True, help="1 short round")
@click.option("--only", multiple=True, type=click.Choice(BENCH_SETUPS))
@click.option("--results-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="where the JSON record goes (created if missing)")
@click.option("--doc", type=click.Path(dir_okay=False),
              help="markdown page whose generated block is replaced, plots beside it")
@click.pass_obj
def bench_peers(obj: Context, repeats: int, quick: bool, only: tuple[str, ...],
                results_dir: str, doc: str | None) -> None:
    """Short connections (three backends, and one against direct to it), keep-alive, bulk and
    packet rate, with the balancer's CPU per connection: lbctl XDP against nftables DNAT,
    HAProxy mode tcp and no balancer, side by side in a lab of its own."""
    if obj.instance != "host":
        raise click.UsageError("the bench builds its own lab: run it without -n")
    from pathlib import Path

    from lbctl.bench.runner import run_peers

    results = run_peers(Path(results_dir), Path(doc) if doc else None, repeats, quick,
                        list(only) or None)
    if not results["complete"]:
        sys.exit(1)


@bench.command("report", epilog=examples(
    "lbctl bench report bench/results/20261201T220000Z.json --doc docs/benchmarks.md"))
@click.argument("record", type=click.Path(exists=True, dir_okay=False))
@click.option("--doc", type=click.Path(dir_okay=False), required=True,
              help="markdown page whose generated block is replaced, plots beside it")
def bench_report(record: str, doc: str) -> None:
    """Redraw a benchmarks page and its plots from a `bench peers` JSON record."""
    from pathlib import Path

    from lbctl.bench.report import write_record_docs

    plots = write_record_docs(Path(record), Path(doc))
    click.echo(f"updated {doc} and {len(plots)} plot(s)")


@bench.command("dataplane", epilog=examples(
    "lbctl bench dataplane                                 # 1,000,000 packets per path",
    "lbctl bench dataplane --repeat 200000 --json b.json   # quicker, with a record"))
@click.option("--repeat", type=click.IntRange(min=5), default=1_000_000, show_default=True,
              help="packets per path (new flows: at most 196,608)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the figures to FILE")
def bench_dataplane(repeat: int, json_out: str | None) -> None:
    """ns per packet of each XDP path (BPF_PROG_TEST_RUN) against a trivial baseline."""
    from lbctl.bench.dataplane import run_bench

    run_bench(repeat=repeat, json_out=json_out)


@bench.command("agent", epilog=examples(
    "lbctl bench agent                         # plan+apply at 10/100/1000 backends, agent CPU",
    "lbctl bench agent --json agent.json       # and a record"))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the figures to FILE")
@click.option("--measure-s", type=click.FloatRange(5, 600), default=30.0, show_default=True,
              help="seconds of agent CPU measured per check type")
def bench_agent(json_out: str | None, measure_s: float) -> None:
    """The control plane: one change at 10/100/1000 backends, and the agent's CPU with 1000
    backends checked every second."""
    from lbctl.bench.agent import run_bench

    run_bench(json_out=json_out, measure_s=measure_s)


# -- the lab and the demo -------------------------------------------------------------------
@main.group(epilog=examples("lbctl lab up", "lbctl lab status", "lbctl lab down"))
def lab() -> None:
    """A namespace lab on this machine: client, balancer, 3 backends."""


@lab.command("up", epilog=examples("lbctl lab up                  # namespaces lbl-*",
                                   "lbctl lab up --prefix mylab   # a second lab beside it"))
@click.option("--prefix", default="lbl", show_default=True, help="namespace name prefix")
def lab_up(prefix: str) -> None:
    """Build the lab (idempotent)."""
    from lbctl.lab import Lab, need_root

    need_root("lab up")
    lab_ = Lab(prefix)
    lab_.up()
    click.echo(f"lab '{prefix}' is up: client {lab_.client.netns}, balancer {lab_.lb.netns} "
               f"({', '.join(lab_.lb_ifaces)}), backends {', '.join(b.netns for b in lab_.backends)}")
    click.echo(f"try: lbctl -n {lab_.lb.netns} attach {' '.join(lab_.lb_ifaces)}")


@lab.command("down", epilog=examples("lbctl lab down"))
@click.option("--prefix", default="lbl", show_default=True)
def lab_down(prefix: str) -> None:
    """Remove the lab's namespaces, servers and balancer pins."""
    from lbctl.lab import Lab, need_root

    need_root("lab down")
    Lab(prefix).down()
    click.echo(f"lab '{prefix}' is down")


@lab.command("status", epilog=examples("lbctl lab status --json"))
@click.option("--prefix", default="lbl", show_default=True)
@json_option
def lab_status(prefix: str, as_json: bool) -> None:
    """Which lab namespaces and servers exist."""
    from lbctl.lab import Lab

    data = Lab(prefix).status().as_dict()
    if as_json:
        echo_json(data)
    else:
        for k, v in data.items():
            click.echo(f"{k:<12} {v}")


@main.command(epilog=examples("lbctl demo            # build, balance, show, clean up",
                              "lbctl demo --keep     # leave the lab up afterwards"))
@click.option("--keep", is_flag=True, help="leave the lab up (prints the command that removes it)")
@click.option("--requests", "count", type=click.IntRange(10, 100000), default=300, show_default=True)
@mode_option
@click.option("--prefix", default="lbl", show_default=True, help="lab namespace name prefix")
def demo(keep: bool, count: int, mode: str | None, prefix: str) -> None:
    """Run the namespace-lab demo: real HTTP through the XDP balancer."""
    from lbctl.demo import run_demo

    if not run_demo(keep=keep, count=count, mode=mode, prefix=prefix):
        click.echo("lbctl: error: the demo's checks failed (see the tables above)", err=True)
        sys.exit(1)

