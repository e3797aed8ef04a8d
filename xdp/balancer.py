"""One balancer instance's data plane: load (or reuse) the pinned programs, attach them to
interfaces in native or generic XDP mode or on the tc ingress hook, detach, and report where
they run."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from xdp import libbpf
from xdp.errors import AttachError, CompileError, NeedRootError, NotAttachedError
from xdp.limits import DEFAULT_LIMITS, RUN_DIR, Limits
from xdp.maps import LbMaps, pin_dir_for
from xdp.modes import GENERIC, TC, default_mode, driver_of, mode_reason, require_ethernet

if TYPE_CHECKING:
    from xdp.program import LoadedProgram

XDP_FLAGS = {"native": libbpf.XDP_FLAGS_DRV_MODE, "generic": libbpf.XDP_FLAGS_SKB_MODE}
# Every attach mode, as `--mode` spells it: the XDP ones, then the tc build on the ingress hook.
MODES: tuple[str, ...] = (*XDP_FLAGS, TC)
PROG_PIN = "prog"          # the XDP build (explain, test runs and the benches use it too)
TC_PROG_PIN = "prog_tc"    # the tc build, pinned while an interface runs it


@dataclass(frozen=True)
class Attachment:
    ifname: str
    ifindex: int
    mode: str          # native | generic | tc
    prog_id: int
    driver: str | None = None
    reason: str = ""   # why this mode: the driver's default, or --mode


def require_root() -> None:
    if os.geteuid() != 0:
        raise NeedRootError("lbctl needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) to load XDP and open "
                            "pinned maps; hint: run it with sudo")


def ensure_bpffs(root: str = "/sys/fs/bpf") -> None:
    """Pins need a bpffs at /sys/fs/bpf; mount one when the host has none."""
    with open("/proc/self/mounts") as mounts:
        if any(line.split()[1:3] == [root, "bpf"] for line in mounts):
            return
    os.makedirs(root, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "bpf", "bpf", root], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AttachError(f"cannot mount bpffs at {root}: {proc.stderr.strip()}; "
                          f"hint: mount -t bpf bpf {root}")


def ipv4_forwarding() -> bool:
    """net.ipv4.ip_forward of the calling thread's network namespace: bpf_fib_lookup only
    forwards with it on, and the kernel's own fallback path needs it too."""
    try:
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def ifindex_of(ifname: str) -> int:
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        names = ", ".join(name for _, name in socket.if_nameindex())
        raise AttachError(f"unknown interface '{ifname}'; hint: interfaces here are: {names}") from None


class Balancer:
    """The data plane of one instance ('host' or a network namespace's name)."""

    def __init__(self, instance: str = "host", limits: Limits = DEFAULT_LIMITS):
        self.instance = instance
        self.limits = limits
        self.pin_dir = pin_dir_for(instance)
        # Per build (False: XDP, True: tc): its open fd, and the bcc object that keeps a
        # program this process compiled alive while its fd is used.
        self._fds: dict[bool, int] = {}
        self._compiled: dict[bool, LoadedProgram] = {}

    # -- the program ------------------------------------------------------------------------
    @property
    def prog_pin(self) -> str:
        return os.path.join(self.pin_dir, PROG_PIN)

    @property
    def tc_prog_pin(self) -> str:
        return os.path.join(self.pin_dir, TC_PROG_PIN)

    # -- a kernel that refuses the tc build ----------------------------------------------------
    # An interface whose driver defaults to tc gets generic XDP instead when the tc build
    # cannot be loaded here (an older kernel's verifier, a kernel without cls_bpf), and
    # status says so: the note is kept in RUN_DIR until a tc build loads.
    @property
    def _tc_refusal_path(self) -> str:
        return os.path.join(RUN_DIR, f"{self.instance}.tc-refused")

    def tc_refusal(self) -> str | None:
        """Why this kernel refused the tc build at the last attach that wanted it, or None."""
        try:
            with open(self._tc_refusal_path) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _note_tc_refusal(self, why: str | None) -> None:
        if why is None:
            try:
                os.unlink(self._tc_refusal_path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(RUN_DIR, exist_ok=True)
        with open(self._tc_refusal_path, "w") as f:
            f.write(why + "\n")

    def pinned_prog_id(self, pin: str | None = None) -> int | None:
        """The id of the pinned XDP build, or of the program pinned at `pin`; None for none."""
        try:
            fd = libbpf.obj_get(pin or self.prog_pin)
        except libbpf.BpfError:
            return None
        try:
            return libbpf.prog_info(fd).id
        finally:
            libbpf.close(fd)

    @property
    def _loaded(self) -> LoadedProgram | None:
        """The XDP build, when this process compiled it (None when it reused the pinned one)."""
        return self._compiled.get(False)

    def _program_fd(self, fresh: bool, tc: bool = False) -> int:
        """A build's pinned program (the XDP one, or with `tc` the tc one), or a newly compiled
        one pinned in its place when fresh or none is pinned. The tc build is compiled against
        the maps the XDP build pinned and checked."""
        if tc in self._fds:
            return self._fds[tc]
        pin = self.tc_prog_pin if tc else self.prog_pin
        if not fresh:
            try:
                self._fds[tc] = libbpf.obj_get(pin)
                return self._fds[tc]
            except libbpf.BpfError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        from xdp.program import compile_and_load

        if not tc:
            ensure_bpffs()
            # bcc reuses pinned maps as they are: maps of another build must be refused before
            # a program is verified against them (their layout may not be the one it was built for).
            if os.path.exists(os.path.join(self.pin_dir, "vips")):
                LbMaps(self.pin_dir, self.limits).close()
        loaded = self._compiled[tc] = compile_and_load(self.pin_dir, self.limits, tc=tc)
        if not tc:
            # Maps are pinned by bcc; verify the ones it just made match this build too.
            LbMaps(self.pin_dir, self.limits).close()
        if os.path.exists(pin):
            os.unlink(pin)
        libbpf.obj_pin(loaded.fd, pin)
        self._fds[tc] = loaded.fd
        return loaded.fd

    # -- attach / detach --------------------------------------------------------------------
    def attachments(self) -> list[Attachment]:
        """Interfaces in this network namespace that run this instance's program."""
        prog_id = self.pinned_prog_id()
        tc_id = self.pinned_prog_id(self.tc_prog_pin)
        if prog_id is None and tc_id is None:
            return []
        out = []
        for ifindex, ifname in socket.if_nameindex():
            mode, running = None, None
            if prog_id is not None:
                q = libbpf.xdp_query(ifindex)
                mode = "native" if q.drv_prog_id == prog_id else "generic" if q.skb_prog_id == prog_id else None
                running = prog_id
            if mode is None and tc_id is not None and libbpf.tc_query(ifindex) == tc_id:
                mode, running = TC, tc_id
            if mode is not None and running is not None:
                driver = driver_of(ifname)
                reason = mode_reason(driver, mode)
                refusal = self.tc_refusal() if mode == GENERIC and default_mode(driver).mode == TC else None
                if refusal:
                    reason = f"{driver}: this kernel refused the tc build ({refusal}); generic instead"
                out.append(Attachment(ifname, ifindex, mode, running, driver, reason))
        return out

    def attach(self, ifnames: list[str], mode: str | None = None) -> list[Attachment]:
        """Attaches to every interface or to none: a refusal undoes the ones already done.

        Without a mode each interface gets its driver's default (xdp/modes.py), and one that
        runs the program already keeps its mode; a mode given applies to every interface."""
        require_root()
        if mode is not None and mode not in MODES:
            raise AttachError(f"unknown attach mode '{mode}'; hint: use {', '.join(MODES)}")
        targets = [(name, ifindex_of(name)) for name in dict.fromkeys(ifnames)]
        for name, _ in targets:
            require_ethernet(name)
        wanted = {ifindex: mode or default_mode(driver_of(name)).mode for name, ifindex in targets}
        current = {a.ifindex: a for a in self.attachments()}
        # A new program build is only loaded when nothing runs the old one. The XDP build is
        # always pinned (explain and test runs use it); the tc build when an interface needs it.
        fd = self._program_fd(fresh=not current)
        prog_id = libbpf.prog_info(fd).id
        tc_fd = None
        if TC in wanted.values():
            try:
                tc_fd = self._program_fd(fresh=not current, tc=True)
                self._note_tc_refusal(None)
            except CompileError as exc:
                if mode == TC:
                    raise
                # Only the driver table asked for tc: generic XDP runs the same decisions.
                self._note_tc_refusal(str(exc).splitlines()[0][:160])
                wanted = {i: GENERIC if m == TC else m for i, m in wanted.items()}
        done: list[tuple[int, str]] = []
        try:
            for name, ifindex in targets:
                have = current.get(ifindex)
                if have and (mode is None or have.mode == mode):
                    continue
                if_mode = wanted[ifindex]
                q = libbpf.xdp_query(ifindex)
                other = q.drv_prog_id or q.skb_prog_id or q.hw_prog_id
                if other and other != prog_id:
                    raise AttachError(
                        f"cannot attach on '{name}': another XDP program (id {other}) is attached; "
                        f"hint: remove it first (ip link set dev {name} xdp off)"
                    )
                # Switching between XDP modes: the old attachment must go first (an interface
                # takes one). Between XDP and tc both can run at once, XDP first on receive:
                # the new one is attached before the old one goes, and no packet passes the
                # kernel un-NATed in between (an un-NATed reply makes the client reset).
                if have and (have.mode == TC) == (if_mode == TC):
                    _detach(ifindex, have.mode)
                    have = None
                try:
                    if if_mode == TC:
                        assert tc_fd is not None
                        libbpf.tc_attach(ifindex, tc_fd)
                    else:
                        libbpf.xdp_attach(ifindex, fd, XDP_FLAGS[if_mode] | libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
                except libbpf.BpfError as exc:
                    hint = ("try --mode generic" if if_mode == "native" else
                            "check the kernel has CONFIG_NET_CLS_BPF and CONFIG_NET_SCH_INGRESS"
                            if if_mode == TC else "check the kernel supports XDP")
                    # The kernel's own reason (extack), e.g. "veth: Peer MTU is too large to set XDP".
                    why = f" ({exc.detail})" if exc.detail else ""
                    raise AttachError(
                        f"cannot attach on '{name}' in {if_mode} mode: {os.strerror(exc.errno or 0)} "
                        f"({exc.errno}){why}; {hint}"
                    ) from exc
                done.append((ifindex, if_mode))
                if have:
                    _detach(ifindex, have.mode)
        except BaseException:
            for ifindex, if_mode in done:
                _detach_quietly(ifindex, if_mode)
            if not current:
                self._unpin_prog()
            raise
        after = self.attachments()
        if not any(a.mode == TC for a in after):
            self._unpin(self.tc_prog_pin)
        return [a for a in after if a.ifindex in {i for _, i in targets}]

    def detach(self, ifnames: list[str] | None = None, purge: bool = False) -> list[Attachment]:
        """Detaches from the named interfaces, or from all when None. Without interfaces left,
        the program is unpinned; purge also removes the maps (the whole configuration)."""
        require_root()
        current = self.attachments()
        if ifnames is None:
            chosen = current
        else:
            by_name = {a.ifname: a for a in current}
            chosen = []
            for name in dict.fromkeys(ifnames):
                ifindex_of(name)
                if name not in by_name:
                    raise NotAttachedError(f"lbctl is not attached to '{name}'; hint: 'lbctl status' lists "
                                           "the attached interfaces")
                chosen.append(by_name[name])
        for a in chosen:
            _detach(a.ifindex, a.mode)
        if len(chosen) == len(current):
            self._unpin_prog()
        elif not any(a.mode == TC for a in current if a not in chosen):
            self._unpin(self.tc_prog_pin)
        if purge:
            shutil.rmtree(self.pin_dir, ignore_errors=True)
        return chosen

    def _unpin_prog(self) -> None:
        self._unpin(self.prog_pin)
        self._unpin(self.tc_prog_pin)

    @staticmethod
    def _unpin(pin: str) -> None:
        try:
            os.unlink(pin)
        except FileNotFoundError:
            pass

    def program_fd(self) -> int:
        """The pinned program, without compiling: explain and test runs use the live one."""
        if not os.path.exists(self.prog_pin):
            raise NotAttachedError(f"balancer not attached: no program pinned at {self.prog_pin}; "
                                   "hint: run 'lbctl attach IFACE' first")
        return self._program_fd(fresh=False)

    def maps(self) -> LbMaps:
        return LbMaps(self.pin_dir, self.limits)

    def close(self) -> None:
        for tc, fd in self._fds.items():
            if tc in self._compiled:
                self._compiled[tc].bpf.cleanup()    # closes the fd with the bcc object
            else:
                libbpf.close(fd)
        self._fds.clear()
        self._compiled.clear()


def _detach(ifindex: int, mode: str) -> None:
    if mode == TC:
        libbpf.tc_detach(ifindex)
    else:
        libbpf.xdp_detach(ifindex, XDP_FLAGS[mode])


def _detach_quietly(ifindex: int, mode: str) -> None:
    try:
        _detach(ifindex, mode)
    except libbpf.BpfError:
        pass


def reload_program(balancer: Balancer) -> list[Attachment]:
    """Hitless program swap: compiles a fresh program against the pinned maps and replaces the
    running one on every attached interface, an XDP attachment with XDP_FLAGS_REPLACE and a tc
    one with its filter replaced in place (one atomic swap per interface; packets see the old
    program or the new one). The maps, and so the flows, stay. Maps of another layout are
    refused before anything is compiled."""
    require_root()
    current = balancer.attachments()
    if not current:
        raise NotAttachedError(f"nothing to reload: instance '{balancer.instance}' is attached to no "
                               "interface; hint: 'lbctl attach IFACE' loads a fresh program")
    # The layout check of attach: maps of another build get IncompatibleMapsError (the purge hint).
    LbMaps(balancer.pin_dir, balancer.limits).close()
    from xdp.program import compile_and_load

    builds = [(False, balancer.prog_pin)]
    if any(a.mode == TC for a in current):
        builds.append((True, balancer.tc_prog_pin))
    old_fds = {tc: libbpf.obj_get(pin) for tc, pin in builds}
    loaded = {}
    # Pinned before the swap (bpffs names take no dot), renamed over the pin after it: the pin
    # names a running program at every moment, and attachments() always finds it.
    staging = {tc: pin + "_next" for tc, pin in builds}
    done: list[Attachment] = []

    def swap(a: Attachment, to_tc_or_xdp: dict[bool, int], from_fds: dict[bool, int]) -> None:
        if a.mode == TC:
            libbpf.tc_attach(a.ifindex, to_tc_or_xdp[True], replace=True)
        else:
            libbpf.xdp_attach(a.ifindex, to_tc_or_xdp[False], XDP_FLAGS[a.mode], old_prog_fd=from_fds[False])

    try:
        for tc, _ in builds:
            loaded[tc] = compile_and_load(balancer.pin_dir, balancer.limits, tc=tc)
        new_fds = {tc: prog.fd for tc, prog in loaded.items()}
        for tc, path in staging.items():
            if os.path.exists(path):
                os.unlink(path)
            libbpf.obj_pin(new_fds[tc], path)
        for a in current:
            try:
                swap(a, new_fds, old_fds)
            except libbpf.BpfError as exc:
                for back in done:   # every interface runs the same programs, old or new
                    try:
                        swap(back, old_fds, new_fds)
                    except libbpf.BpfError:
                        pass
                for path in staging.values():
                    os.unlink(path)
                raise AttachError(
                    f"cannot swap the program on '{a.ifname}' ({a.mode}): {os.strerror(exc.errno or 0)} "
                    f"({exc.errno}); the old program still runs everywhere; hint: 'lbctl status' shows "
                    "what is attached (another tool may have replaced it)") from exc
            done.append(a)
        for tc, pin in builds:
            os.replace(staging[tc], pin)
    finally:
        for prog in loaded.values():
            prog.bpf.cleanup()
        for fd in old_fds.values():
            libbpf.close(fd)
    return balancer.attachments()
