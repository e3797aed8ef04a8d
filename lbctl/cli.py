"""The `lbctl` command line: parse, call one library function, print. Errors become one line."""
from __future__ import annotations

import ipaddress
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any

import click

from lbctl.errors import ConfigError, NetnsError
from lbctl.model import (
    AFFINITY_NAMES,
    BACKEND_STATES,
    FORWARDING_NAMES,
    PROTO_NAMES,
    SNAT_PORTS_DEFAULT,
    XDP_MODES,
    HostPort,
    check_weight,
    format_port_range,
    parse_host_port,
    parse_port_range,
    parse_snat_addrs,
)
from xdp.codec import format_endpoint
from xdp.errors import XdpError

if TYPE_CHECKING:
    from lbctl.control import Controller

def package_version() -> str:
    """Looked up only for --version: importing importlib.metadata cost every command 0.1-0.2 s."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lbctl")
    except PackageNotFoundError:  # running from a checkout without install
        return "0.0.0+checkout"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"lbctl, version {package_version()}")
        ctx.exit()


def examples(*lines: str) -> str:
    """Help epilogue: one example per line, each with a comment (kept unwrapped)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


class Context:
    """What commands need: which instance, and a factory for its controller (tests inject one).
    `namespace_gone`: -n named a namespace that no longer exists but whose pins remain, so the
    process stays where it is and only commands that work on pins alone may run."""

    def __init__(self, instance: str, controller_factory: Callable[[str], Controller] | None = None,
                 namespace_gone: bool = False):
        self.instance = instance
        self._factory = controller_factory
        self._controller: Controller | None = None
        self.namespace_gone = namespace_gone

    @property
    def controller(self) -> Controller:
        if self._controller is None:
            if self._factory is None:
                from lbctl.control import Controller

                self._factory = Controller
            self._controller = self._factory(self.instance)
        return self._controller


def _route(addr: str) -> str:
    """A VIP address as BGP announces it: a /32, or a /128 for IPv6."""
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


def enter_netns(name: str) -> None:
    """Switches only the network namespace (like `ip -n`), keeping the host's /sys/fs/bpf."""
    from lbctl.netns import NETNS_DIR, enter

    if "/" in name or not os.path.exists(os.path.join(NETNS_DIR, name)):
        raise NetnsError(f"network namespace '{name}' not found; hint: 'ip netns list' shows them")
    try:
        enter(name)
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
        return percent(value)
    return "-" if value is None else str(value)


def percent(share: float) -> str:
    """A share as a percentage with one decimal, or with as many as it takes to show two
    significant digits: a backend with 0.0098% of the ring must not read as 0.0%."""
    if share <= 0 or share >= 0.001:
        return f"{share:.1%}"
    digits = -math.floor(math.log10(share * 100)) + 1
    return f"{share * 100:.{digits}f}%"


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


class SnatAddrsType(click.ParamType):
    """--snat ADDR[,ADDR]: full-NAT source addresses."""

    name = "ADDR[,ADDR]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_snat_addrs(str(value))
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None


class PortRangeType(click.ParamType):
    """LOW-HIGH: full-NAT's source-port range."""

    name = "LOW-HIGH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_port_range(str(value))
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
        from lbctl.metrics import parse_listen

        try:
            parse_listen(str(value))
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None
        return str(value)


class AddrOrHostPortType(click.ParamType):
    """ADDR or ADDR:PORT, for filters: (address, port or None)."""

    name = "ADDR[:PORT]"

    def __init__(self, what: str):
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int | None]:
        if isinstance(value, tuple):
            return value
        text = str(value)
        if not text.startswith("[") and text.count(":") != 1:
            try:
                return str(ipaddress.ip_address(text)), None
            except ValueError:
                raise InputError(f"malformed {self.what} '{text}': not an IP address; hint: e.g. "
                                 "10.0.0.10, 10.0.0.10:80, 2001:db8::10 or [2001:db8::10]:80",
                                 ctx=ctx, param=param) from None
        try:
            hp = parse_host_port(text, self.what)
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None
        return hp.addr, hp.port


VIP = HostPortType("VIP")
BACKEND = HostPortType("backend")
CLIENT = HostPortType("client")


def proto_option(f):
    return click.option("--proto", default="tcp", show_default=True, type=click.Choice(PROTO_NAMES,
                        case_sensitive=False), help="VIP protocol")(f)


def mode_option(f):
    return click.option("--mode", type=click.Choice(XDP_MODES), default=None,
                        help="mode for every interface: XDP native (in the driver) or generic "
                             "(on the socket buffer), or tc (the same program on the tc ingress "
                             "hook) [default: by driver: tc on veth, native on NICs; "
                             "'lbctl status' says why]")(f)


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
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and exit.")
@click.pass_context
def main(ctx: click.Context, netns: str | None) -> None:
    """XDP/eBPF L4 load balancer (two-arm NAT) control."""
    if isinstance(ctx.obj, Context):   # injected by tests
        return
    instance = "host"
    if netns:
        from xdp.maps import pin_dir_for

        try:
            enter_netns(netns)
        except NetnsError as exc:
            # The namespace went (ip netns del) and left its pins: status and purge still work.
            gone_with_pins = "/" not in netns and os.path.isdir(pin_dir_for(netns))
            if not gone_with_pins:
                click.echo(f"lbctl: error: {exc}", err=True)
                sys.exit(exc.exit_code)
            if ctx.invoked_subcommand not in ("status", "detach"):
                click.echo(f"lbctl: error: network namespace '{netns}' no longer exists; its pinned "
                           f"state remains in {pin_dir_for(netns)}; hint: 'lbctl -n {netns} detach "
                           "--all --purge' removes it, 'lbctl status' lists such instances", err=True)
                sys.exit(exc.exit_code)
            ctx.obj = Context(netns, namespace_gone=True)
            return
        instance = netns
    ctx.obj = Context(instance)


# -- attach / detach / status ---------------------------------------------------------------
def _counted(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


@main.command(epilog=examples(
    "lbctl attach eth0 eth1                  # both arms, each in its driver's faster mode",
    "lbctl attach eth0 --mode generic        # when the driver has no native XDP",
    "lbctl attach eth0 eth1 --mode native    # force one mode on both",
    "lbctl attach eth0 eth1 --fresh          # drop VIPs and backends left pinned by an earlier run",
))
@click.argument("ifaces", nargs=-1, required=True)
@mode_option
@click.option("--fresh", is_flag=True, help="start empty: remove pinned maps left by an earlier run")
@click.pass_obj
def attach(obj: Context, ifaces: tuple[str, ...], mode: str | None, fresh: bool) -> None:
    """Load the balancer and attach it to IFACE... (compiles once; maps persist)."""
    result = obj.controller.attach(list(ifaces), mode, fresh)
    for a in result.attachments:
        click.echo(f"attached {a.ifname} ({a.mode}, prog {a.prog_id}): {a.reason}")
    if result.restored is not None:
        r = result.restored
        click.echo(f"restored {_counted(r['vips'], 'VIP')}, {_counted(r['backends'], 'backend')} and "
                   f"{_counted(r['flows'], 'live flow')} from the pinned maps (--fresh starts empty)")
    for warning in result.warnings:
        click.echo(f"lbctl: warning: {warning}", err=True)
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
@click.option("--force", is_flag=True, help="detach even though live flows will break")
@click.pass_obj
def detach(obj: Context, ifaces: tuple[str, ...], all_: bool, purge: bool, force: bool) -> None:
    """Detach the balancer from IFACE... or --all (refused while flows are live, unless --force)."""
    if purge and not all_:
        raise InputError("--purge removes the whole configuration, so it goes with --all, not with "
                         "interfaces; hint: lbctl detach --all --purge")
    if ifaces and all_:
        raise InputError(f"give interfaces or --all, not both; hint: lbctl detach {' '.join(ifaces)} "
                         "or lbctl detach --all")
    if not ifaces and not all_:
        raise InputError("nothing to detach from; hint: lbctl detach IFACE... or lbctl detach --all")
    if obj.namespace_gone:
        if not purge:
            raise InputError(f"network namespace '{obj.instance}' no longer exists, so nothing is "
                             f"attached; hint: lbctl -n {obj.instance} detach --all --purge removes "
                             "its pinned state")
        obj.controller.purge_orphaned()
        click.echo(f"removed pinned maps of '{obj.instance}' (its namespace is gone)")
        return
    done = obj.controller.detach(None if all_ else list(ifaces), purge, force)
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
    gone = " (its network namespace is gone)" if st.get("namespace_gone") else ""
    click.echo(f"instance  {st['instance']}{gone}")
    program = f"prog {st['prog_id']}" if st["prog_id"] else "not loaded"
    if st.get("tc_prog_id"):
        program += f" (XDP build), prog {st['tc_prog_id']} (tc build)"
    click.echo(f"program   {program}")
    click.echo(f"maps      {st['pin_dir'] if st['maps'] else 'none'}")
    click.echo(f"vips      {st['vips']}")
    click.echo(f"backends  {st['backends']}")
    agent = st.get("agent")
    click.echo(f"agent     {'pid ' + str(agent['pid']) + ', ' + agent['config'] if agent else 'not running'}")
    if agent and agent["all_failing"]:
        click.echo(f"WARNING   every backend fails its checks, last healthy set kept: {', '.join(agent['all_failing'])}")
    node = agent.get("cluster") if agent else None
    if node:
        line = (f"node '{node['node']}', revision {node['applied_revision']} applied "
                f"(latest seen {node['latest_revision']})")
        if node.get("rejected_revision"):
            line += f", refused revision {node['rejected_revision']}"
        if not node["etcd_reachable"]:
            line += (f"; etcd UNREACHABLE since {time.strftime('%H:%M:%S', time.localtime(node['unreachable_since']))}"
                     if node.get("unreachable_since") else "; etcd UNREACHABLE")
            line += ", serving the last applied revision, retrying"
        click.echo(f"cluster   {line}")
    click.echo("")
    print_table(st["attached"], [("IFACE", "ifname"), ("MODE", "mode"), ("PROG", "prog_id"),
                                 ("WHY", "why")],
                "not attached to any interface")
    for warning in st.get("warnings", []):
        click.echo(f"warning: {warning}")
    for name in st.get("orphaned_instances", []):
        click.echo(f"orphaned: instance '{name}' keeps pinned state but its network namespace is gone; "
                   f"hint: lbctl -n {name} detach --all --purge")
    if st.get("vip_modes"):
        click.echo("")
        print_table(st.get("vip_modes", []), [("VIP", "vip"), ("PROTO", "proto"), ("FORWARDING", "forwarding"),
                                              ("AFFINITY", "affinity"), ("RING", "ring")], "")
    if st.get("l7_backends"):
        click.echo("")
        rows = [dict(r, ejected=f"{r['ejected_s']}s" if r["ejected_s"] else "-") for r in st["l7_backends"]]
        print_table(rows, [("L7 VIP", "vip"), ("BACKEND", "backend"), ("WEIGHT", "weight"), ("STATE", "state"),
                           ("HEALTH", "health"), ("EJECTED", "ejected"), ("EJECTIONS", "ejections"),
                           ("RETRIES", "retries")], "")
    if st.get("bgp"):
        _echo_bgp(st["bgp"])


def _echo_bgp(view: dict) -> None:
    click.echo("")
    drained = "  DRAINED (lbctl node undrain)" if view["drained"] else ""
    click.echo(f"bgp       AS {view['local_as']}, router id {view['router_id']}, hold time "
               f"{view['hold_time_s']} s{drained}")
    by_addr = {s["peer"]: s for s in view.get("sessions", [])}
    rows = [{"peer": p["addr"], "as": p["as"], "state": by_addr.get(p["addr"], {}).get("info") or "unknown",
             "since": by_addr.get(p["addr"], {}).get("since", "")} for p in view["peers"]]
    print_table(rows, [("PEER", "peer"), ("AS", "as"), ("SESSION", "state"), ("SINCE", "since")], "")
    if view.get("sessions_error"):
        click.echo(f"warning: {view['sessions_error']}")
    click.echo(f"announced {', '.join(_route(a) for a in view['announced']) or 'nothing'}")
    for addr, why in view.get("withheld", {}).items():
        click.echo(f"withheld  {_route(addr)}: {why}")
    if view.get("error"):
        click.echo(f"warning: {view['error']}")


# -- VIPs -----------------------------------------------------------------------------------
@main.group(epilog=examples(
    "lbctl vip add 10.0.0.10:80                 # TCP",
    "lbctl vip add 10.0.0.10:53 --proto udp     # UDP",
    "lbctl vip list --json",
))
def vip() -> None:
    """Add, delete and list VIPs."""


@vip.command("add", epilog=examples("lbctl vip add 10.0.0.10:80", "lbctl vip add 10.0.0.10:53 --proto udp",
                                    "lbctl vip add 10.0.0.10:443 --affinity client",
                                    "lbctl vip add 10.0.0.10:80 --forwarding dsr   # backends answer clients directly",
                                    "lbctl vip add 10.0.0.10:80 --forwarding fullnat   # one-arm: source rewritten too",
                                    "lbctl vip add 10.0.0.10:80 --forwarding fullnat --snat 10.0.1.2,10.0.1.3 "
                                    "--snat-ports 20000-29999",
                                    "lbctl vip add '[2001:db8::10]:80' --forwarding fullnat --snat 2001:db8:1::2"))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@proto_option
@click.option("--forwarding", default=FORWARDING_NAMES[0], show_default=True, type=click.Choice(FORWARDING_NAMES),
              help="nat (two-arm: replies come back through the balancer), fullnat (one-arm: the "
                   "source is rewritten too) or dsr (L2: only the MAC is rewritten, backends hold "
                   "the VIP and answer clients directly; see docs/modes.md)")
@click.option("--affinity", default=AFFINITY_NAMES[0], show_default=True, type=click.Choice(AFFINITY_NAMES),
              help="what picks a new flow's backend: flow (the 5-tuple) or client (the source "
                   "address alone: one client stays on one backend)")
@click.option("--snat", type=SnatAddrsType(), default=None,
              help="fullnat: the source addresses backends see, of the VIP's family (default: the "
                   "balancer's own address toward each backend, by the routing table)")
@click.option("--snat-ports", type=PortRangeType(), default=None,
              help=f"fullnat: the source-port range claimed per flow [default: "
                   f"{format_port_range(SNAT_PORTS_DEFAULT)}, below Linux's ephemeral ports]")
@click.option("--force", is_flag=True,
              help="allow a VIP on an address and port where a local service listens")
@click.pass_obj
def vip_add(obj: Context, vip_addr: HostPort, proto: str, forwarding: str, affinity: str,
            snat: tuple[str, ...] | None, snat_ports: tuple[int, int] | None, force: bool) -> None:
    """Add a VIP (no backends yet: its packets are dropped until one is added)."""
    full_nat = {k: v for k, v in (("snat", snat), ("snat_ports", snat_ports)) if v is not None}
    echo_plan(obj.controller.vip_add(vip_addr.on(proto), force, affinity, forwarding, **full_nat))


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
    print_table(rows, [("VIP", "vip"), ("PROTO", "proto"), ("FORWARDING", "forwarding"), ("AFFINITY", "affinity"),
                       ("BACKENDS", "backends"),
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
    "lbctl backend add 10.0.0.10:80 10.0.1.13:80 10.0.1.14:80   # several in one change",
))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@click.argument("backend_addrs", metavar="ADDR:PORT...", type=BACKEND, nargs=-1, required=True)
@proto_option
@weight_option(1)
@click.pass_obj
def backend_add(obj: Context, vip_addr: HostPort, backend_addrs: tuple[HostPort, ...], proto: str,
                weight: int) -> None:
    """Add one or more backends to a VIP (several: one change, one ring rebuild)."""
    backends = [b.on(proto) for b in backend_addrs]
    echo_plan(obj.controller.backend_add(vip_addr.on(proto), backends[0] if len(backends) == 1 else backends,
                                         weight))


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


@backend.command("check", epilog=examples(
    "lbctl backend check 10.0.0.10:80 10.0.1.11         # before or after adding it",
    "lbctl backend check 10.0.0.10:80 10.0.1.11:8080    # a given port (DSR: must be the VIP's)",
    "lbctl backend check 10.0.0.10:80 10.0.1.11 --json  # for scripts: exit 1 when a check fails",
))
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@click.argument("backend_addr", metavar="ADDR[:PORT]", type=AddrOrHostPortType("backend"))
@proto_option
@json_option
@click.pass_obj
def backend_check(obj: Context, vip_addr: HostPort, backend_addr: tuple[str, int | None], proto: str,
                  as_json: bool) -> None:
    """What the balancer can check of a backend for a VIP: the route to it (DSR: the same L2
    segment), the interface runs the program, its MAC resolves, and for DSR its port; each
    check ✓ or ✗ with evidence and a fix; exit 1 when any fails."""
    from lbctl import doctor as doc

    checks = doc.check_backend(obj.instance, vip_addr.on(proto), *backend_addr)
    if as_json:
        echo_json(doc.as_json(checks))
    else:
        for line in doc.render(checks):
            click.echo(line)
    sys.exit(0 if all(c.ok for c in checks) else 1)


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
    for warning in result.plan.warnings:
        click.echo(f"lbctl: warning: {warning}", err=True)
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


class EtcdUrlType(click.ParamType):
    """etcd://HOST:PORT/PREFIX: where a cluster's document and node records live."""

    name = "etcd://HOST:PORT/PREFIX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from lbctl.etcd import EtcdUrl, parse_etcd_url

        if isinstance(value, EtcdUrl):
            return value
        try:
            return parse_etcd_url(str(value))
        except ConfigError as exc:
            raise InputError(str(exc), ctx=ctx, param=param) from None


ETCD_URL = EtcdUrlType()


@main.command("agent", epilog=examples(
    "lbctl agent -f /etc/lbctl/lbctl.yaml                      # foreground; systemd runs it so",
    "lbctl -n lbl-lb agent -f lab.yaml --metrics-addr 127.0.0.1:9811   # inside a namespace",
    "kill -HUP $(pidof -s lbctl)                               # re-read the file, apply the difference",
    "lbctl agent --config etcd://10.0.0.5:2379/lbctl           # one document for every node, in etcd",
))
@click.option("-f", "--file", "path", type=click.Path(dir_okay=False),
              help="the config file (YAML): the whole desired state")
@click.option("--config", "etcd_url", type=ETCD_URL,
              help="follow the document in etcd instead of a file (stored by 'lbctl cluster push')")
@click.option("--node-name", metavar="NAME",
              help="with --config: this node's name in 'lbctl cluster status' [default: the -n "
                   "namespace, else the host name]")
@click.option("--metrics-addr", type=ListenType(), default="127.0.0.1:9810", show_default=True,
              help="ADDR:PORT for Prometheus /metrics (localhost by default)")
@click.option("--detach-on-exit", is_flag=True,
              help="detach from every interface when stopped (default: keep forwarding)")
@click.pass_obj
def agent_cmd(obj: Context, path: str | None, etcd_url: Any, node_name: str | None, metrics_addr: str,
              detach_on_exit: bool) -> None:
    """Run the balancer from FILE (or from etcd): attach and apply, health checks, metrics,
    SIGHUP re-reads the file; with --config, each new revision in etcd is applied.

    SIGTERM stops the agent and leaves the data plane forwarding on the last applied state;
    a restarted agent finds the maps equal to the file and moves nothing. A node that cannot
    reach etcd keeps serving what it applied last and catches up when etcd answers."""
    from lbctl.agent import Agent, setup_logging

    if (path is None) == (etcd_url is None):
        raise InputError("give the desired state once: -f FILE or --config etcd://HOST:PORT/PREFIX; hint: "
                         "lbctl agent -f /etc/lbctl/lbctl.yaml")
    if node_name is not None and etcd_url is None:
        raise InputError("--node-name names a cluster node, so it goes with --config; hint: lbctl agent "
                         "--config etcd://HOST:2379/lbctl --node-name NAME")
    cluster = None
    if etcd_url is not None:
        import socket

        from lbctl.cluster import ClusterNode, check_node_name

        name = check_node_name(node_name or (obj.instance if obj.instance != "host" else socket.gethostname()))
        cluster = ClusterNode(etcd_url, name)
    setup_logging()
    sys.exit(Agent(obj.controller, path or str(etcd_url), metrics_addr, detach_on_exit, package_version(),
                   cluster).run())


# -- a cluster: one document in etcd for every node --------------------------------------------
@main.group(epilog=examples(
    "lbctl cluster push -f lbctl.yaml --etcd etcd://10.0.0.5:2379/lbctl   # every node applies it",
    "lbctl cluster status --etcd etcd://10.0.0.5:2379/lbctl               # who runs which revision",
))
def cluster() -> None:
    """One desired state for many nodes, stored in etcd (agents run with --config etcd://...)."""


def etcd_option(f):
    return click.option("--etcd", "etcd_url", required=True, type=ETCD_URL,
                        help="where the cluster's keys live: etcd://HOST:PORT/PREFIX")(f)


@cluster.command("push", epilog=examples(
    "lbctl cluster push -f lbctl.yaml --etcd etcd://127.0.0.1:2379/lbctl",
    "lbctl -n lbl-lb cluster push -f lab.yaml --etcd etcd://10.77.9.1:2379/lbctl   # from a namespace",
))
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False),
              help="the config file (YAML): the whole desired state of every node")
@etcd_option
def cluster_push(path: str, etcd_url: Any) -> None:
    """Validate FILE and store it as the next revision; every node's agent applies it. A
    broken file is refused before anything is stored."""
    from lbctl.cluster import push

    r = push(etcd_url, path)
    if r.unchanged:
        click.echo(f"unchanged: {etcd_url.config_key} already holds this document (revision {r.revision})")
    else:
        click.echo(f"stored revision {r.revision} at {etcd_url.config_key} ({_counted(r.vips, 'VIP')}; "
                   f"replaces {r.previous or 'nothing'})")


@cluster.command("status", epilog=examples(
    "lbctl cluster status --etcd etcd://127.0.0.1:2379/lbctl",
    "lbctl cluster status --etcd etcd://127.0.0.1:2379/lbctl --json",
))
@etcd_option
@json_option
def cluster_status(etcd_url: Any, as_json: bool) -> None:
    """One line per node: the revision it applied against the latest, its backends' health,
    its ring fingerprints, BGP and when it last reported."""
    from lbctl.cluster import health_summary, status

    st = status(etcd_url)
    if as_json:
        echo_json(st)
        return
    latest = st["latest_revision"]
    click.echo(f"latest revision {latest or 'none (nothing pushed yet)'} at {etcd_url.config_key}")
    rows = []
    for n in st["nodes"]:
        applied = n.get("applied_revision") or 0
        rev = f"{applied}/{latest}" + ("" if n["current"] else " BEHIND")
        if n.get("rejected_revision"):
            rev += f" (refused {n['rejected_revision']})"
        rings = ", ".join(f"{vip} {fp}" for vip, fp in sorted((n.get("rings") or {}).items())) or "-"
        if n["ring_mismatch"]:
            rings += " MISMATCH"
        bgp = n.get("bgp")
        rows.append({"name": n["name"], "rev": rev, "health": health_summary(n), "rings": rings,
                     "bgp": bgp.get("summary", "-") if isinstance(bgp, dict) else "-",
                     "seen": "-" if n.get("last_seen_s") is None else f"{n['last_seen_s']:.0f}s ago"})
    print_table(rows, [("NODE", "name"), ("REVISION", "rev"), ("HEALTH", "health"), ("RINGS", "rings"),
                       ("BGP", "bgp"), ("LAST SEEN", "seen")],
                "no nodes report (none runs 'lbctl agent --config ...', or their leases expired)")
    for n in st["nodes"]:
        if n.get("rejected_error"):
            click.echo(f"{n['name']}: refused revision {n['rejected_revision']}: {n['rejected_error']}")


# -- stats and flows ------------------------------------------------------------------------
@main.command(epilog=examples("lbctl stats", "lbctl stats --json", "lbctl stats --watch   # every second",
                              "lbctl stats 10.0.0.10:80          # one VIP and its backends",
                              "lbctl stats --top 5               # the 5 busiest VIPs and backends"))
@click.argument("vip_addr", metavar="[VIP:PORT]", required=False, type=VIP)
@proto_option
@json_option
@click.option("--watch", is_flag=True, help="repeat every second until Ctrl-C")
@click.option("--top", type=click.IntRange(min=1), metavar="N",
              help="only the N VIPs and N backends with the most packets")
@click.pass_obj
def stats(obj: Context, vip_addr: HostPort | None, proto: str, as_json: bool, watch: bool,
          top: int | None) -> None:
    """Counters: by outcome, per VIP and per backend."""
    while True:
        data = obj.controller.stats(vip_addr.on(proto) if vip_addr else None)
        if top is not None:
            for key in ("vips", "backends"):
                data[key] = sorted(data[key], key=lambda r: r["packets"], reverse=True)[:top]
        if as_json:
            echo_json(data)
        else:
            if watch:
                click.clear()
            if vip_addr is None:     # outcomes count every packet, not one VIP's
                outcomes = [{"outcome": k, **v} for k, v in data["outcomes"].items()]
                print_table(outcomes, [("OUTCOME", "outcome"), ("PACKETS", "packets"), ("BYTES", "bytes")], "")
                click.echo("")
            print_table(data["vips"], [("VIP", "vip"), ("PROTO", "proto"), ("FWD", "forwarding"), ("PACKETS", "packets"),
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
    "lbctl explain '[2001:db8:7::5]:40000' '[2001:db8::10]:80'   # IPv6: brackets",
))
@click.argument("client_addr", metavar="CLIENT:PORT", type=CLIENT)
@click.argument("vip_addr", metavar="VIP:PORT", type=VIP)
@proto_option
@json_option
@click.pass_obj
def explain(obj: Context, client_addr: HostPort, vip_addr: HostPort, proto: str, as_json: bool) -> None:
    """Which backend the running balancer picks for a new connection from CLIENT:PORT, and
    where the next packet of a flow already tracked for it goes (changes nothing)."""
    client, vip_ep = client_addr.on(proto), vip_addr.on(proto)
    ans = obj.controller.explain(client, vip_ep)
    if as_json:
        echo_json(ans)
        return
    click.echo(f"{client} -> {vip_ep} ({proto})")
    if ans["verdict"] == "not_vip":
        click.echo(f"  {vip_ep} is not a VIP here: the packet passes to the kernel untouched")
    else:
        label = "new connection (SYN)" if proto == "tcp" else "a datagram"
        click.echo(f"  {label}: {_explained(ans)}")
        tracked = ans.get("tracked_flow")
        if tracked is not None and proto == "tcp":
            click.echo(f"  tracked flow ({tracked['flow_state']}, {tracked['flow_age_ms'] / 1000:.1f} s old), "
                       f"its next packet: {_explained(tracked)}")
        elif proto == "tcp":
            click.echo("  tracked flow: none live for this tuple")
    if not ans.get("attached_to"):
        click.echo("  note: the program is attached to no interface, so no packet is balanced now; "
                   "this is what it would do once attached (lbctl attach IFACE)")


def _explained(ans: dict) -> str:
    if ans["verdict"] == "no_backend":
        return (f"no usable backend (ring slot {ans['slot']} of generation {ans['ring_generation']} "
                "is empty): dropped")
    how = _HOW_SENT.get(ans.get("forwarding") or "nat", "")
    if "snat" in ans:
        # full-NAT: a tracked flow's source as held; a new one's address(es) and port range.
        how += (f", from {ans['snat']}" if "snat_ports" not in ans else
                f", from {ans['snat']} port {ans['snat_ports']} (claimed by the SYN)")
    if ans["verdict"] == "flow_hit":
        return (f"backend {ans['backend']} (id {ans['backend_id']}) by flow-table hit "
                f"({ans['flow_state']}, tracked for {ans['flow_age_ms'] / 1000:.1f} s){how}")
    return (f"backend {ans['backend']} (id {ans['backend_id']}) by ring slot {ans['slot']} "
            f"of generation {ans['ring_generation']}{how}")


# How a forwarding mode sends the packet, for explain's sentences (nat: said by "backend").
_HOW_SENT = {"nat": "", "fullnat": ", full-NAT (source rewritten too)",
             "dsr": ", DSR: sent to the backend's MAC unchanged, it answers the client directly"}


@main.command(epilog=examples(
    "lbctl doctor                                  # every check, each with its evidence",
    "lbctl doctor 10.0.0.10:80                     # only this VIP's backends",
    "lbctl doctor -f /etc/lbctl/lbctl.yaml         # attached where the agent's config says",
    "lbctl doctor --json                           # for scripts: exit 1 when a check fails",
))
@click.argument("vip_addr", metavar="[VIP:PORT]", type=VIP, required=False)
@proto_option
@click.option("-f", "--file", "config_path", type=click.Path(dir_okay=False),
              help="agent config file: check the interfaces and xdp_mode it names")
@json_option
@click.pass_obj
def doctor(obj: Context, vip_addr: HostPort | None, proto: str, config_path: str | None,
           as_json: bool) -> None:
    """Why the balancer does not forward: each check ✓ or ✗ with evidence and a fix; exit 1
    when any fails."""
    from lbctl import doctor as doc

    checks = doc.diagnose(obj.instance, None if vip_addr is None else vip_addr.on(proto), config_path)
    if as_json:
        echo_json(doc.as_json(checks))
    else:
        for line in doc.render(checks):
            click.echo(line)
        failed = sum(1 for c in checks if not c.ok)
        click.echo(f"{len(checks) - failed} of {len(checks)} checks pass" +
                   (f"; {failed} fail" if failed else ""))
    sys.exit(0 if all(c.ok for c in checks) else 1)


class AddrType(click.ParamType):
    """An IPv4 or IPv6 address, or where a port is allowed ADDR:PORT / [IPv6]:PORT."""

    name = "ADDR"

    def __init__(self, what: str, port: bool):
        self.what, self.port = what, port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, int]:
        import ipaddress

        text = str(value)
        addr, port, bracketed = text, "", False
        if text.startswith("["):
            addr, close, rest = text[1:].partition("]")
            bracketed = True
            if not close or (rest and not (self.port and rest.startswith(":"))):
                addr = ""       # refused below
            port = rest[1:] if rest else ""
        elif self.port and text.count(":") == 1:
            addr, _, port = text.partition(":")
        try:
            ip = ipaddress.ip_address(addr)
            # A zone means nothing to the program's filter (it compares addresses only).
            if (bracketed and ip.version != 6) or "%" in addr:
                raise ValueError
            number = int(port) if port else 0
            if not 0 <= number <= 65535 or (port and number == 0):
                raise ValueError
        except ValueError:
            form = ("ADDR, ADDR:PORT or [IPv6]:PORT" if self.port
                    else "an IPv4 or IPv6 address")
            example = ("10.0.1.11:8080 or [2001:db8:1::11]:8080" if self.port
                       else "10.0.2.5 or 2001:db8::5")
            raise InputError(f"{self.what} '{text}' is not {form}; hint: e.g. {example}",
                             ctx=ctx, param=param) from None
        return str(ip), number


def trace_filter(vip_addr: HostPort | None, proto: str, client: tuple[str, int] | None,
                 backend_addr: tuple[str, int] | None):
    from xdp.tracing import Filter

    vip_ep = None if vip_addr is None else vip_addr.on(proto)
    return Filter(vip=None if vip_ep is None else (vip_ep.addr, vip_ep.port, vip_ep.proto),
                  client=None if client is None else client[0], backend=backend_addr)


def _stale_note(run) -> None:
    if run.stale_pid is not None:
        click.echo(f"lbctl: note: tracing was left on by pid {run.stale_pid}, which is gone; "
                   "turned it off", err=True)


@main.command("trace", epilog=examples(
    "lbctl trace                                   # every packet, until Ctrl-C",
    "lbctl trace --vip 10.0.0.10:80 --count 20     # this VIP's next 20 packets",
    "lbctl trace --client 10.0.2.5                 # one client, both directions",
    "lbctl trace --backend 10.0.1.11:8080 --json   # one JSON object a line",
    "lbctl trace --vip '[2001:db8::10]:80'         # an IPv6 VIP (--client, --backend too)",
))
@click.option("--vip", "vip_addr", metavar="VIP:PORT", type=VIP, help="only this VIP's packets")
@proto_option
@click.option("--client", type=AddrType("client", port=False), help="only this client's packets")
@click.option("--backend", "backend_addr", type=AddrType("backend", port=True),
              help="only packets to or from this backend (ADDR, ADDR:PORT or [IPv6]:PORT)")
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after N packets")
@json_option
@click.pass_obj
def trace_cmd(obj: Context, vip_addr: HostPort | None, proto: str, client: tuple[str, int] | None,
              backend_addr: tuple[str, int] | None, count: int | None, as_json: bool) -> None:
    """The program's decisions live, one line a packet: interface, tuple in, outcome, tuple
    out, backend. Tracing is off again when it stops (Ctrl-C or --count)."""
    from lbctl import trace as tracemod

    def emit(event, backends) -> None:
        if as_json:
            click.echo(json.dumps(tracemod.as_dict(event, backends), sort_keys=True))
        else:
            click.echo(tracemod.line(event, backends))
        sys.stdout.flush()

    run = tracemod.run(obj.instance, trace_filter(vip_addr, proto, client, backend_addr), count, emit)
    _stale_note(run)


@main.command("capture", epilog=examples(
    "lbctl capture -w lb.pcapng --count 100        # 100 packets, before and after the rewrite",
    "lbctl capture -w web.pcapng --vip 10.0.0.10:80 # until Ctrl-C",
    "tcpdump -r lb.pcapng -n                       # read it back",
))
@click.option("-w", "path", required=True, type=click.Path(dir_okay=False, writable=True),
              metavar="FILE", help="pcapng file to write (interface 'before' and 'after')")
@click.option("--vip", "vip_addr", metavar="VIP:PORT", type=VIP, help="only this VIP's packets")
@proto_option
@click.option("--count", type=click.IntRange(min=1), default=None, help="stop after N packets")
@click.pass_obj
def capture_cmd(obj: Context, path: str, vip_addr: HostPort | None, proto: str, count: int | None) -> None:
    """Writes the frames the XDP program sees, before and after its rewrite, as pcapng (the
    first 128 bytes of each)."""
    from lbctl import capture as capmod
    from xdp.balancer import Balancer, require_root

    require_root()
    Balancer(obj.instance).maps().close()   # refused before the file is created
    run = capmod.capture(obj.instance, path, trace_filter(vip_addr, proto, None, None), count)
    _stale_note(run)
    click.echo(f"{run.events} packets written to {path}", err=True)


@main.group(epilog=examples("lbctl flows list --limit 20", "lbctl flows flush"))
def flows() -> None:
    """Inspect or flush the connection-tracking table."""


@flows.command("list", epilog=examples(
    "lbctl flows list                          # first 100 live flows",
    "lbctl flows list --all                    # with expired entries the table still holds",
    "lbctl flows list --vip 10.0.0.10:80 --client 10.0.2.5",
    "lbctl flows list --backend 10.0.1.11:8080 --json --limit 5"))
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--all", "include_expired", is_flag=True,
              help="include entries past their timeout (kept until reused or evicted; marked expired)")
@click.option("--vip", "vip_addr", metavar="VIP:PORT", type=VIP, help="only flows to this VIP")
@click.option("--backend", "backend_addr", metavar="ADDR:PORT", type=BACKEND, help="only flows to this backend")
@click.option("--client", "client_addr", type=AddrOrHostPortType("client"), help="only flows from ADDR[:PORT]")
@proto_option
@json_option
@click.pass_obj
def flows_list(obj: Context, limit: int, include_expired: bool, vip_addr: HostPort | None,
               backend_addr: HostPort | None, client_addr: tuple[str, int | None] | None, proto: str,
               as_json: bool) -> None:
    """List tracked flows (client -> VIP -> backend) with their age and idle time."""
    rows = obj.controller.flows(limit, include_expired, vip_addr.on(proto) if vip_addr else None,
                                backend_addr.on(proto) if backend_addr else None,
                                *(client_addr if client_addr else (None, None)))
    if as_json:
        echo_json(rows)
        return
    for r in rows:
        r["client_ep"] = format_endpoint(r['client'], r['client_port'])
        r["vip_ep"] = format_endpoint(r['vip'], r['vip_port'])
        r["backend_ep"] = format_endpoint(r['backend'], r['backend_port'])
        # full-NAT: the source the backend sees; other modes keep the client's.
        r["snat_ep"] = format_endpoint(r['snat'], r['snat_port']) if r.get("snat") else "-"
        r["state_shown"] = f"{r['state']} (expired)" if r["expired"] else r["state"]
        r["age"] = f"{r['age_s']:.1f}s"
        r["idle"] = f"{r['idle_s']:.1f}s"
    print_table(rows, [("CLIENT", "client_ep"), ("VIP", "vip_ep"), ("PROTO", "proto"),
                       ("BACKEND", "backend_ep"), ("FWD", "forwarding"), ("SNAT", "snat_ep"),
                       ("STATE", "state_shown"), ("AGE", "age"),
                       ("IDLE", "idle")], "no live flows" if not include_expired else "no flows")


@flows.command("flush", epilog=examples("lbctl flows flush             # connections re-pick by the ring"))
@click.pass_obj
def flows_flush(obj: Context) -> None:
    """Forget every tracked flow (established connections re-pick by the ring)."""
    click.echo(f"flushed {obj.controller.flows_flush()} flows")


# -- benchmarks -----------------------------------------------------------------------------
# The harness lives in lbctl.bench, imported only inside these commands: the product never
# loads it otherwise. The setup names are spelled here for the same reason (a unit test
# holds them equal to lbctl.bench.spec.SETUPS).
BENCH_SETUPS = ("xdp-native", "xdp-generic", "xdp-tc", "xdp-fullnat", "xdp-dsr", "xdp-ipv6", "nftables",
                "haproxy", "direct")


@main.group(epilog=examples("lbctl bench dataplane   # ns per packet of each XDP path",
                            "lbctl bench peers       # against nftables, HAProxy and direct"))
def bench() -> None:
    """Measure the balancer (benchmarks report; they never assert)."""


@bench.command("peers", epilog=examples(
    "lbctl bench peers --results-dir bench/results --doc docs/benchmarks.md   # 3 rounds, ~15 min",
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
    "lbctl bench agent --json agent.json --plot docs/agent-bench.png   # a record and a plot"))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the figures to FILE")
@click.option("--plot", "png", type=click.Path(dir_okay=False), help="also draw them into FILE.png (matplotlib)")
@click.option("--measure-s", type=click.FloatRange(5, 600), default=30.0, show_default=True,
              help="seconds of agent CPU measured per check type")
def bench_agent(json_out: str | None, measure_s: float, png: str | None) -> None:
    """The control plane: one change at 10/100/1000 backends, and the agent's CPU with 1000
    backends checked every second."""
    from lbctl.bench.agent import run_bench

    run_bench(json_out=json_out, measure_s=measure_s, png=png)


@bench.command("l7", epilog=examples(
    "lbctl bench l7 --results-dir bench/results --doc docs/benchmarks.md   # 3 rounds, ~5 min",
    "lbctl bench l7 --quick                       # 1 short round; JSON record in ."))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 20),
              help="alternating rounds (and agent restarts per warm-up mode)")
@click.option("--quick", is_flag=True, help="1 short round, 1 restart per warm-up mode")
@click.option("--results-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="where the JSON record goes (created if missing)")
@click.option("--doc", type=click.Path(dir_okay=False),
              help="markdown page whose L7 block is replaced, the plot beside it")
@click.option("--lab-prefix", help="namespace prefix of the bench's lab (default b7 + 6 hex digits)")
@click.pass_obj
def bench_l7(obj: Context, repeats: int, quick: bool, results_dir: str, doc: str | None,
             lab_prefix: str | None) -> None:
    """The L7 proxy (lbctl agent, a mode: l7 VIP) against HAProxy mode http, same backends and
    client, alternating rounds: keep-alive and new-connection requests/s, p50/p99, CPU per
    request; pool on against off; time to first byte after a start, eager against lazy."""
    if obj.instance != "host":
        raise click.UsageError("the bench builds its own lab: run it without -n")
    from pathlib import Path

    from lbctl.bench.l7 import run_l7

    results = run_l7(Path(results_dir), Path(doc) if doc else None, repeats, quick,
                     ttfb_restarts=repeats, prefix=lab_prefix)
    if not results["complete"]:
        sys.exit(1)


# -- the node in a cluster -------------------------------------------------------------------
@main.group(epilog=examples("lbctl node drain      # withdraw every VIP (maintenance)",
                            "lbctl node undrain    # announce again"))
def node() -> None:
    """This node's place in the cluster: withdraw its BGP announcements or make them again."""


def _node_drain(obj: Context, drained: bool) -> None:
    from lbctl.agent import set_drained
    from xdp.balancer import require_root

    require_root()
    out = set_drained(obj.instance, drained)
    verb = "drained" if drained else "undrained"
    if out["agent"] is None:
        click.echo(f"node {verb}: no agent runs for instance '{obj.instance}'; the next one starts "
                   f"{'drained' if drained else 'announcing'}")
        return
    view = out["bgp"]
    if view is None:
        click.echo(f"node {verb}; the agent (pid {out['agent']}) has no bgp block, so it announces nothing")
        return
    announced = ", ".join(_route(a) for a in view["announced"]) or "nothing"
    if not out["settled"]:
        click.echo(f"node {verb}; the agent (pid {out['agent']}) has not caught up yet: it announces "
                   f"{announced}; check with lbctl status")
        sys.exit(1)
    click.echo(f"node {verb}: announcing {announced}")
    for addr, why in view.get("withheld", {}).items():
        click.echo(f"withheld  {_route(addr)}: {why}")


@node.command("drain", epilog=examples("lbctl node drain", "lbctl -n lbl-lb1 node drain"))
@click.pass_obj
def node_drain(obj: Context) -> None:
    """Withdraw every VIP over BGP; established connections go on (routers move them to the
    other nodes, whose rings pick the same backends). Stays drained across agent restarts."""
    _node_drain(obj, True)


@node.command("undrain", epilog=examples("lbctl node undrain"))
@click.pass_obj
def node_undrain(obj: Context) -> None:
    """Announce again every VIP this node can serve."""
    _node_drain(obj, False)


# -- the lab and the demo -------------------------------------------------------------------
@main.group(epilog=examples("lbctl lab up", "lbctl lab up --nodes 2", "lbctl lab status", "lbctl lab down"))
def lab() -> None:
    """A namespace lab on this machine: client, balancer, 3 backends; or with --nodes N a
    router (BIRD, ECMP, etcd) and N balancer nodes, each with its agent following etcd and
    announcing over BGP."""


@lab.command("up", epilog=examples("lbctl lab up                  # namespaces lbl-*",
                                   "lbctl lab up --prefix mylab   # a second lab beside it",
                                   "lbctl lab up --nodes 2        # router + 2 nodes announcing the VIP"))
@click.option("--prefix", default="lbl", show_default=True, help="namespace name prefix")
@click.option("--nodes", type=click.IntRange(1, 8), default=1, show_default=True,
              help="balancer nodes; 2 or more adds a router with BGP and ECMP")
@click.option("--forwarding", type=click.Choice(["nat", "dsr", "fullnat"]),
              help="with --nodes 2+: the VIP's forwarding (default: dsr, else fullnat)")
def lab_up(prefix: str, nodes: int, forwarding: str | None) -> None:
    """Build the lab (idempotent)."""
    from lbctl.lab import need_root
    from lbctl.lab_cluster import ClusterLab, lab_for

    need_root("lab up")
    if forwarding is not None and nodes == 1:
        raise click.UsageError("--forwarding is for --nodes 2 or more (the single-node lab attaches by hand)")
    lab_ = lab_for(prefix, nodes, forwarding)
    lab_.up()
    if isinstance(lab_, ClusterLab):
        click.echo(f"lab '{prefix}' is up: client {lab_.client.netns}, router {lab_.router.netns} "
                   f"(BIRD, ECMP), nodes {', '.join(n.netns for n in lab_.nodes)} (agents, "
                   f"forwarding {lab_.forwarding}), backends {', '.join(b.netns for b in lab_.backends)}")
        click.echo(f"the router's route to {lab_.vip}: via {', '.join(lab_.vip_next_hops())}")
        click.echo(f"etcd: {lab_.etcd_url} (in {lab_.router.netns}; the agents run with --config "
                   f"{lab_.etcd_url} --node-name lbK)")
        click.echo(f"try: lbctl -n {lab_.router.netns} cluster status --etcd {lab_.etcd_url_here}; "
                   f"lbctl -n {lab_.nodes[0].netns} status; lbctl -n {lab_.nodes[0].netns} node drain")
        return
    click.echo(f"lab '{prefix}' is up: client {lab_.client.netns}, balancer {lab_.lb.netns} "
               f"({', '.join(lab_.lb_ifaces)}), backends {', '.join(b.netns for b in lab_.backends)}")
    addrs = ", ".join(f"{b.name} {b.addr}" + (f" {b.addr6}" if b.addr6 else "") for b in lab_.backends)
    click.echo(f"VIP {lab_.vip}" + (f" and {lab_.vip6}" if lab_.vip6 else "") + f"; backends {addrs}")
    click.echo(f"try: lbctl -n {lab_.lb.netns} attach {' '.join(lab_.lb_ifaces)}")


@lab.command("down", epilog=examples("lbctl lab down"))
@click.option("--prefix", default="lbl", show_default=True)
def lab_down(prefix: str) -> None:
    """Remove the lab's namespaces, servers, agents and balancer pins."""
    from lbctl.lab import need_root
    from lbctl.lab_cluster import lab_for

    need_root("lab down")
    lab_for(prefix).down()
    click.echo(f"lab '{prefix}' is down")


@lab.command("status", epilog=examples("lbctl lab status --json"))
@click.option("--prefix", default="lbl", show_default=True)
@json_option
def lab_status(prefix: str, as_json: bool) -> None:
    """Which lab namespaces and servers exist."""
    from lbctl.lab_cluster import lab_for

    data = lab_for(prefix).status().as_dict()
    if as_json:
        echo_json(data)
    else:
        for k, v in data.items():
            click.echo(f"{k:<12} {v}")


@main.command(epilog=examples("lbctl demo            # build, balance, show, clean up",
                              "lbctl demo --keep     # leave the lab up afterwards",
                              "lbctl demo --nodes 2  # two nodes behind ECMP, one fails"))
@click.option("--keep", is_flag=True, help="leave the lab up (prints the command that removes it)")
@click.option("--requests", "count", type=click.IntRange(10, 100000), default=300, show_default=True)
@mode_option
@click.option("--prefix", default="lbl", show_default=True, help="lab namespace name prefix")
@click.option("--nodes", type=click.IntRange(1, 8), default=1, show_default=True,
              help="2 or more: nodes behind a router's ECMP route, one failing")
def demo(keep: bool, count: int, mode: str | None, prefix: str, nodes: int) -> None:
    """Run the namespace-lab demo: real HTTP through the XDP balancer (with --nodes 2: spread
    over two nodes by BGP and ECMP, one node failing, connections carrying on, and one
    cluster push reaching every node)."""
    from lbctl.demo import run_cluster_demo, run_demo

    if nodes > 1:
        ok = run_cluster_demo(nodes, keep=keep, prefix=prefix)
    else:
        ok = run_demo(keep=keep, count=count, mode=mode, prefix=prefix)
    if not ok:
        click.echo("lbctl: error: the demo's checks failed (see the tables above)", err=True)
        sys.exit(1)

