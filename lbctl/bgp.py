"""BGP announcements through a BIRD 2 of the agent's own: its config (rendered from
bird.conf.j2), the process (started in the balancer's namespace, dying with the agent), its
control socket under /run/lbctl/<instance>/, and the sessions read back from it."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jinja2

from lbctl.config import BgpSpec
from lbctl.errors import LbctlError

TEMPLATE = Path(__file__).with_name("bird.conf.j2")
BIRD = "bird"
CONF_FILE = "bird.conf"
SOCKET_FILE = "bird.ctl"
PID_FILE = "bird.pid"
LOG_FILE = "bird.log"
# Drain flag of `lbctl node drain`: a file, so it outlives an agent restart (not a reboot:
# /run is tmpfs, as the maps are).
DRAIN_FILE = "drained"
STATIC_PROTOCOL = "lbctl_vips"
# BIRD rotates bird.log past this size (into bird.log.old): at most twice it per node in tmpfs.
LOG_LIMIT_BYTES = 1 << 20
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 3.0


class BgpError(LbctlError):
    """The agent's BGP speaker could not be configured, started or reached."""

    exit_code = 11  # 8 is a trace already running (xdp/tracing.py)


@dataclass(frozen=True)
class Session:
    """One BGP peer as BIRD reports it."""

    peer: str             # the peer's address
    state: str            # BIRD's protocol state: up, start, down, ...
    info: str             # the BGP state: Established, Active, Connect, Idle, ...
    since: str            # BIRD's time of the last change (time of day)

    @property
    def established(self) -> bool:
        return self.info.startswith("Established")


def protocol_name(peer_addr: str) -> str:
    """BIRD protocol name of a peer: its address spelled out, so `show protocols` names it."""
    return "peer_" + peer_addr.replace(".", "_")


def _peer_of(name: str) -> str | None:
    m = re.fullmatch(r"peer_(\d+)_(\d+)_(\d+)_(\d+)", name)
    return ".".join(m.groups()) if m else None


def render(instance: str, spec: BgpSpec, router_id: str, announced: Iterable[str], *,
           next_hop6: str | None = None, log_path: str | None = None,
           log_limit: int = LOG_LIMIT_BYTES) -> str:
    """The whole BIRD config for this spec announcing exactly `announced` (VIP addresses,
    IPv4 as /32, IPv6 as /128). `next_hop6`: this node's global IPv6 address on the link, the
    /128s' next hop (BIRD takes it from the interface): without one, no IPv6 address may be
    announced. The sessions always carry both families, so a first IPv6 VIP restarts none.
    `log_path`: BIRD's own log, rotated past `log_limit` bytes; None logs to stderr."""
    addrs = [ipaddress.ip_address(a) for a in announced]
    announced4 = [str(a) for a in sorted(a for a in addrs if a.version == 4)]
    announced6 = [str(a) for a in sorted(a for a in addrs if a.version == 6)]
    if announced6 and next_hop6 is None:
        raise BgpError(f"cannot announce {announced6[0]}/128 without an IPv6 next hop; hint: give the "
                       "first interface a global IPv6 address")
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    template = env.from_string(TEMPLATE.read_text())
    peers = [{"name": protocol_name(p.addr), "addr": p.addr, "asn": p.asn} for p in spec.peers]
    return template.render(instance=instance, router_id=router_id, local_as=spec.local_as,
                           hold_time=spec.hold_time_s,
                           # RFC 4271 suggests a third of the hold time; BIRD wants at least 1.
                           keepalive_time=max(1, spec.hold_time_s // 3),
                           peers=peers,
                           announced4=announced4, announced6=announced6, log_path=log_path,
                           log_limit=log_limit)


def first_address(ifname: str, family: int = socket.AF_INET) -> str | None:
    """The first IPv4 address of an interface in this namespace (the default router id), or
    with AF_INET6 its first global IPv6 address (the next hop of IPv6 routes)."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            return None
        for a in ipr.get_addr(family=family, index=idx[0]):
            addr = a.get("IFA_ADDRESS")
            if addr and (family == socket.AF_INET or a["scope"] == 0):   # 0: global, not link-local
                return str(addr)
    return None


# -- the control socket ---------------------------------------------------------------------
def command(sock_path: str, text: str, timeout_s: float = 5.0) -> list[tuple[int, str]]:
    """One command on BIRD's control socket: its reply as (code, text) lines. A line starting
    with a space continues the code before it; the reply ends at a code followed by a space.
    8xxx and 9xxx codes (runtime and parse errors) raise BgpError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(sock_path)
            f = s.makefile("rwb")
            f.readline()                                  # "0001 BIRD 2.0.12 ready."
            f.write(text.encode() + b"\n")
            f.flush()
            out: list[tuple[int, str]] = []
            code = 0
            while True:
                raw = f.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip("\n")
                if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
                    code = int(line[:4])
                    out.append((code, line[5:]))
                    if line[4] == " ":
                        break
                else:
                    out.append((code, line.removeprefix(" ")))
    except OSError as exc:
        raise BgpError(f"cannot talk to BIRD on {sock_path}: {exc.strerror or exc}; hint: is the "
                       "agent with a bgp block running? (lbctl status)") from None
    if out and out[-1][0] >= 8000:
        raise BgpError(f"BIRD refused '{text}': {out[-1][1]}; hint: see {sock_path[:-len(SOCKET_FILE)]}"
                       f"{LOG_FILE}")
    return out


def sessions(sock_path: str) -> list[Session]:
    """The BGP peers of this speaker, from `show protocols`."""
    out = []
    for code, text in command(sock_path, "show protocols"):
        if code != 1002:
            continue
        cols = text.split(None, 5)
        if len(cols) < 5 or cols[1] != "BGP":
            continue
        peer = _peer_of(cols[0])
        if peer is not None:
            out.append(Session(peer, cols[3], cols[5].strip() if len(cols) > 5 else "", cols[4]))
    return out


# -- the speaker -----------------------------------------------------------------------------
class Speaker:
    """The BIRD of one instance: started once, reconfigured when the announced set or the
    bgp block changes, stopped (withdrawing everything) when the agent stops."""

    def __init__(self, instance: str, run_dir: str, spec: BgpSpec, router_id: str,
                 log_limit: int = LOG_LIMIT_BYTES):
        self.instance = instance
        self.log_limit = log_limit
        self.run_dir = run_dir
        self.spec = spec
        self.router_id = router_id
        self.announced: frozenset[str] = frozenset()
        self.next_hop6: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf_path = os.path.join(run_dir, CONF_FILE)
        self.sock_path = os.path.join(run_dir, SOCKET_FILE)
        self.pid_path = os.path.join(run_dir, PID_FILE)
        self.log_path = os.path.join(run_dir, LOG_FILE)

    def _write(self, spec: BgpSpec, router_id: str, announced: Iterable[str], next_hop6: str | None) -> None:
        text = render(self.instance, spec, router_id, announced, next_hop6=next_hop6, log_path=self.log_path,
                      log_limit=self.log_limit)
        tmp = f"{self.conf_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        check = subprocess.run([BIRD, "-p", "-c", tmp], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            os.unlink(tmp)
            raise BgpError(f"BIRD refuses the rendered config: {check.stderr.strip() or check.stdout.strip()}; "
                           "hint: check the bgp block (docs/scale-out.md)")
        os.replace(tmp, self.conf_path)

    def start(self) -> None:
        """Starts BIRD announcing nothing yet; must run on the agent's main thread (the death
        signal follows the thread that started it)."""
        if shutil.which(BIRD) is None:
            raise BgpError("BIRD is not installed (the bgp block needs it); hint: apt-get install bird2, "
                           "or run lbctl/setup.sh")
        os.makedirs(self.run_dir, exist_ok=True)
        self._stop_leftover()
        self._write(self.spec, self.router_id, (), None)
        # BIRD writes (and rotates) bird.log itself once it has read its config; what it says
        # before that (a fatal start error) goes there through stderr.
        with open(self.log_path, "ab") as log:
            try:
                # setpriv sets the parent-death signal and execs BIRD (which keeps it): when the
                # agent's thread that started it ends, also by kill -9, the kernel sends BIRD
                # SIGTERM, so no BIRD announces for an agent that is gone. -f: BIRD stays the
                # agent's child (daemonising would drop the signal).
                self.proc = subprocess.Popen(
                    ["setpriv", "--pdeathsig=TERM", "--", BIRD, "-f", "-c", self.conf_path,
                     "-s", self.sock_path, "-P", self.pid_path],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            except FileNotFoundError:
                raise BgpError("setpriv is not installed; hint: apt-get install util-linux") from None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise BgpError(f"BIRD exited with {self.proc.returncode} at start: {self._log_tail()}; "
                               f"hint: see {self.log_path}")
            try:
                command(self.sock_path, "show status", timeout_s=1.0)
                return
            except BgpError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BgpError(f"BIRD did not open its control socket {self.sock_path} in "
                                   f"{START_TIMEOUT_S:.0f} s; hint: see {self.log_path}") from None
                time.sleep(0.05)

    def set(self, announced: Iterable[str], spec: BgpSpec | None = None,
            router_id: str | None = None, next_hop6: str | None = None) -> bool:
        """Announces exactly `announced` (and takes a new bgp block); True when anything
        changed. BIRD's soft reconfiguration keeps sessions whose settings did not change."""
        wanted = frozenset(announced)
        spec = spec or self.spec
        router_id = router_id or self.router_id
        if (wanted, spec, router_id, next_hop6) == (self.announced, self.spec, self.router_id, self.next_hop6):
            return False
        self._write(spec, router_id, wanted, next_hop6)
        command(self.sock_path, "configure")
        self.announced, self.spec, self.router_id, self.next_hop6 = wanted, spec, router_id, next_hop6
        return True

    def sessions(self) -> list[Session]:
        return sessions(self.sock_path)

    def stop(self, clean: bool = False) -> None:
        """Graceful: BIRD closes each session with a Cease notification, so the routers drop
        this node's routes at once rather than after the hold time. `clean` also removes the
        config and log (the agent's stop: its run directory is then empty and goes); a failed
        start keeps them, since its error points at the log."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                command(self.sock_path, "down", timeout_s=1.0)
            except BgpError:
                self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        logs = (self.conf_path, self.log_path, f"{self.log_path}.old")
        for path in (self.sock_path, self.pid_path) + (logs if clean else ()):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _stop_leftover(self) -> None:
        """A BIRD of this instance that outlived its agent (started by hand, or a death signal
        that could not be delivered) would answer on the same socket: end it first. Only a
        process running this instance's own config file is touched."""
        try:
            pid = int(Path(self.pid_path).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if self.conf_path.encode() not in cmdline:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _log_tail(self) -> str:
        try:
            lines = Path(self.log_path).read_text().strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1][-300:] if lines else "(empty log)"

