"""Typed ctypes binding to libbpf.so.1 (maps, object info, XDP attach, test runs); no compiler."""

from __future__ import annotations

import ctypes
import enum
import errno as errno_codes
import functools
import os
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, Union

from xdp.errors import XdpError

if TYPE_CHECKING:  # typing.Self is 3.11+; the project still runs on 3.9
    from typing_extensions import Self

# CLI processes open pinned maps without bcc (and so without clang or kernel headers):
# everything here goes through the shared library only, loaded on first use.

LIBBPF_SONAME = "libbpf.so.1"
LIBBPF_INSTALL_HINT = "apt-get install libbpf1"

PathLike = Union[str, bytes, "os.PathLike[str]"]

# Map update flags (linux/bpf.h).
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# XDP attach flags (linux/if_link.h).
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
XDP_FLAGS_HW_MODE = 1 << 3
XDP_FLAGS_REPLACE = 1 << 4

# What bpf_xdp_query reports in attach_mode (enum XDP_ATTACHED_*).
XDP_ATTACHED_NONE = 0
XDP_ATTACHED_DRV = 1
XDP_ATTACHED_SKB = 2
XDP_ATTACHED_HW = 3
XDP_ATTACHED_MULTI = 4
# The project's names for the modes, as the CLI spells them (`--mode native|generic`).
XDP_ATTACH_MODE_NAMES = {
    XDP_ATTACHED_NONE: "none",
    XDP_ATTACHED_DRV: "native",
    XDP_ATTACHED_SKB: "generic",
    XDP_ATTACHED_HW: "offload",
    XDP_ATTACHED_MULTI: "multi",
}

# XDP program verdicts (enum xdp_action), as BPF_PROG_TEST_RUN returns them in retval.
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4

BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_XDP = 6
# tc verdicts (linux/pkt_cls.h) as a sched_cls test run returns them.
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
BPF_STATS_RUN_TIME = 0


class MapType(enum.IntEnum):
    """enum bpf_map_type (UAPI linux/bpf.h): the kernel's numbers, by name."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32


# bpftool's spelling of each type, by the kernel's number.
MAP_TYPE_NAMES = tuple(t.name.lower() for t in MapType)
# Per-CPU maps hold one value per possible CPU, each padded to 8 bytes, in every syscall.
PERCPU_MAP_TYPES = frozenset({MapType.PERCPU_HASH, MapType.PERCPU_ARRAY,
                              MapType.LRU_PERCPU_HASH, MapType.PERCPU_CGROUP_STORAGE})
# What a batch call fails with on a map type that has no batch operations: the kernel's
# internal ENOTSUPP (524) leaks to user space from BPF_DO_BATCH; EOPNOTSUPP to be safe.
ENOTSUPP = 524
BATCH_UNSUPPORTED = frozenset({ENOTSUPP, errno_codes.EOPNOTSUPP})

BPF_OBJ_NAME_LEN = 16
BPF_TAG_SIZE = 8


class BpfError(XdpError, OSError):
    """A libbpf call failed; str() names the call and the object it acted on. An XdpError, so
    the CLI's one translation point reports it in one line, and an OSError with its errno."""

    def __init__(
        self, code: int, operation: str, target: str = "", detail: str = "", hint: str = ""
    ) -> None:
        super().__init__(code, os.strerror(code))
        self.operation = operation
        self.target = target
        # What the kernel said beyond errno (netlink extack), e.g. "XDP program already attached".
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        text = f"{self.operation}({self.target}): {self.strerror}"
        if self.detail:
            text += f" ({self.detail})"
        if self.hint:
            text += f"; hint: {self.hint}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError pickles as (errno, strerror); keep our fields across processes.
        return (type(self), (self.errno, self.operation, self.target, self.detail, self.hint))

    @property
    def exit_code(self) -> int:  # type: ignore[override]  # by errno, not by class
        return 77 if self.errno in (errno_codes.EPERM, errno_codes.EACCES) else 1


class LibbpfMissingError(BpfError):
    """libbpf.so.1 cannot be loaded, or lacks a function this module needs."""

    exit_code = 69  # type: ignore[assignment]  # like bcc missing: install something

    def __init__(self, reason: str = f"{LIBBPF_SONAME} not found") -> None:
        super().__init__(
            errno_codes.ENOENT, "dlopen", repr(LIBBPF_SONAME), hint=LIBBPF_INSTALL_HINT)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}; hint: {self.hint}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


# --- C structs (layouts from libbpf 1.1 bpf.h/libbpf.h and the kernel UAPI linux/bpf.h) ---

class _MapBatchOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64),
    ]


class _TestRunOpts(ctypes.Structure):
    # sizeof is 80 with or without batch_size (tail padding), so libbpf >= 0.8 accepts it.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _XdpAttachOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


class _TcHook(ctypes.Structure):
    # struct bpf_tc_hook (libbpf >= 0.6): the clsact qdisc's hook of one interface.
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int),
                ("attach_point", ctypes.c_int), ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    # struct bpf_tc_opts: one filter of a hook, named by its handle and priority.
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32),
                ("priority", ctypes.c_uint32)]


class _XdpQueryOpts(ctypes.Structure):
    # libbpf 1.1 layout; later libbpf versions appended feature_flags/xdp_zc_max_segs and
    # read only `sz` bytes of ours. libbpf rejects non-zero bytes past the last field it
    # knows, so every call uses a fresh zeroed instance.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("prog_id", ctypes.c_uint32),
        ("drv_prog_id", ctypes.c_uint32),
        ("hw_prog_id", ctypes.c_uint32),
        ("skb_prog_id", ctypes.c_uint32),
        ("attach_mode", ctypes.c_uint8),
    ]


class _BpfMapInfo(ctypes.Structure):
    # struct bpf_map_info, 88 bytes in the 6.1 UAPI. Newer kernels copy only what we ask for.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _BpfProgInfo(ctypes.Structure):
    # struct bpf_prog_info, 232 bytes in the 6.1 UAPI. The __aligned_u64 fields are user
    # pointers for arrays the kernel would fill; left zero, it fills none of them.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * BPF_TAG_SIZE),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),  # a 1-bit field plus 31 bits of padding
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
        ("recursion_misses", ctypes.c_uint64),
        ("verified_insns", ctypes.c_uint32),
        ("attach_btf_obj_id", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


assert ctypes.sizeof(_BpfMapInfo) == 88 and ctypes.sizeof(_BpfProgInfo) == 232
assert ctypes.sizeof(_TestRunOpts) == 80 and ctypes.sizeof(_XdpQueryOpts) == 32

_u32p = ctypes.POINTER(ctypes.c_uint32)
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_obj_get": (ctypes.c_int, [ctypes.c_char_p]),
    "bpf_obj_pin": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_map_update_elem": (
        ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64]),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_map_update_batch": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, _u32p, ctypes.POINTER(_MapBatchOpts)]),
    "bpf_map_lookup_batch": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        _u32p, ctypes.POINTER(_MapBatchOpts)]),
    "bpf_map_lookup_and_delete_batch": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        _u32p, ctypes.POINTER(_MapBatchOpts)]),
    "bpf_map_delete_batch": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_void_p, _u32p, ctypes.POINTER(_MapBatchOpts)]),
    "bpf_obj_get_info_by_fd": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, _u32p]),
    "bpf_prog_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_map_get_fd_by_id": (ctypes.c_int, [ctypes.c_uint32]),
    "bpf_prog_test_run_opts": (ctypes.c_int, [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]),
    "bpf_xdp_attach": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(_XdpAttachOpts)]),
    "bpf_xdp_detach": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(_XdpAttachOpts)]),
    "bpf_xdp_query": (ctypes.c_int, [
        ctypes.c_int, ctypes.c_int, ctypes.POINTER(_XdpQueryOpts)]),
    "bpf_enable_stats": (ctypes.c_int, [ctypes.c_int]),
    "bpf_tc_hook_create": (ctypes.c_int, [ctypes.POINTER(_TcHook)]),
    "bpf_tc_attach": (ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
    "bpf_tc_detach": (ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
    "bpf_tc_query": (ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)]),
    # Takes and returns a function pointer; void* lets us hand back whatever was there.
    "libbpf_set_print": (ctypes.c_void_p, [ctypes.c_void_p]),
}


@functools.cache
def _lib() -> Any:
    """libbpf.so.1 with every function's argument and return types declared."""
    try:
        lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
    except OSError:
        raise LibbpfMissingError() from None
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            func = getattr(lib, name)
        except AttributeError:
            raise LibbpfMissingError(
                f"{LIBBPF_SONAME} has no {name} (need libbpf >= 1.0)") from None
        func.restype = restype
        func.argtypes = argtypes
    return lib


def _call(func_name: str, *args: Any) -> tuple[int, int]:
    """Run one libbpf function; return (result, errno), errno 0 on success."""
    # libbpf >= 1.0 returns -errno and also sets errno; older builds returned -1 with
    # errno set. errno is cleared first so that a stale value never names the failure.
    ctypes.set_errno(0)
    ret = int(getattr(_lib(), func_name)(*args))
    if ret >= 0:
        return ret, 0
    return ret, ctypes.get_errno() or -ret


def _describe_fd(fd: int, kind: str) -> str:
    """'map 'vips' fd 5' when the kernel tells us the name, else 'fd 5'; used in error text."""
    info = _BpfMapInfo() if kind == "map" else _BpfProgInfo()
    length = ctypes.c_uint32(ctypes.sizeof(info))
    ret, _ = _call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(length))
    if ret < 0 or not info.name:
        return f"{kind} fd {fd}"
    return f"{kind} {info.name.decode(errors='replace')!r} fd {fd}"


def _raise(code: int, operation: str, target: str, detail: str = "") -> NoReturn:
    hint = "needs root (CAP_BPF, CAP_NET_ADMIN)" if code == errno_codes.EPERM else ""
    if code in BATCH_UNSUPPORTED:
        hint = "this map type has no batch operations in this kernel"
    raise BpfError(code, operation, target, detail=detail, hint=hint)


def _path_text(path: PathLike) -> str:
    return repr(os.fsdecode(path))


# --- objects: pin, open, close, info ---

def obj_get(path: PathLike) -> int:
    """Open a pinned map or program; the caller owns the returned fd."""
    fd, err = _call("bpf_obj_get", os.fsencode(path))
    if err:
        _raise(err, "bpf_obj_get", _path_text(path))
    return fd


def obj_pin(fd: int, path: PathLike) -> None:
    """Pin a map or program fd at a path inside a bpffs mount."""
    _, err = _call("bpf_obj_pin", fd, os.fsencode(path))
    if err:
        _raise(err, "bpf_obj_pin", f"fd {fd}, {_path_text(path)}")


def close(fd: int) -> None:
    os.close(fd)


def prog_get_fd_by_id(prog_id: int) -> int:
    fd, err = _call("bpf_prog_get_fd_by_id", prog_id)
    if err:
        _raise(err, "bpf_prog_get_fd_by_id", f"id {prog_id}")
    return fd


def map_get_fd_by_id(map_id: int) -> int:
    fd, err = _call("bpf_map_get_fd_by_id", map_id)
    if err:
        _raise(err, "bpf_map_get_fd_by_id", f"id {map_id}")
    return fd


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    name: str
    flags: int = 0

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES[self.type] if self.type < len(MAP_TYPE_NAMES) else str(self.type)

    @property
    def value_bytes(self) -> int:
        """Bytes one value takes in a syscall: per-CPU maps pass every possible CPU's slot."""
        return percpu_value_size(self.value_size) if self.percpu else self.value_size

    @property
    def percpu(self) -> bool:
        return self.type in PERCPU_MAP_TYPES


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str  # hex, as bpftool shows it
    # Both stay 0 unless run-time stats are on (sysctl kernel.bpf_stats_enabled, or
    # enable_run_time_stats()).
    run_time_ns: int
    run_cnt: int
    # Instructions the verifier processed to accept the program (0 before Linux 5.16): how
    # close it came to the 1M limit (BPF_COMPLEXITY_LIMIT_INSNS).
    verified_insns: int = 0


def map_info(fd: int) -> MapInfo:
    info = _BpfMapInfo()
    length = ctypes.c_uint32(ctypes.sizeof(info))
    _, err = _call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(length))
    if err:
        _raise(err, "bpf_obj_get_info_by_fd", f"map fd {fd}")
    return MapInfo(
        id=info.id, type=info.type, key_size=info.key_size, value_size=info.value_size,
        max_entries=info.max_entries, name=info.name.decode(errors="replace"),
        flags=info.map_flags,
    )


def prog_info(fd: int) -> ProgInfo:
    info = _BpfProgInfo()
    length = ctypes.c_uint32(ctypes.sizeof(info))
    _, err = _call("bpf_obj_get_info_by_fd", fd, ctypes.byref(info), ctypes.byref(length))
    if err:
        _raise(err, "bpf_obj_get_info_by_fd", f"prog fd {fd}")
    return ProgInfo(
        id=info.id, type=info.type, name=info.name.decode(errors="replace"),
        tag=bytes(info.tag).hex(), run_time_ns=info.run_time_ns, run_cnt=info.run_cnt,
        verified_insns=info.verified_insns,
    )


def enable_run_time_stats() -> int:
    """Turn on per-program run_cnt/run_time_ns until the returned fd is closed."""
    fd, err = _call("bpf_enable_stats", BPF_STATS_RUN_TIME)
    if err:
        _raise(err, "bpf_enable_stats", "BPF_STATS_RUN_TIME")
    return fd


# --- map elements ---
# Sizes passed here must be the map's own: the kernel reads key_size bytes from each key and
# writes value_size bytes into our buffer whatever length we think it has. MapHandle checks.

def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value stored under key, or None when the key is absent."""
    value = ctypes.create_string_buffer(value_size)
    _, err = _call("bpf_map_lookup_elem", fd, key, value)
    if err == errno_codes.ENOENT:
        return None
    if err:
        _raise(err, "bpf_map_lookup_elem", _describe_fd(fd, "map"))
    return value.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Store value under key. A full hash map fails with E2BIG; BPF_NOEXIST with EEXIST."""
    _, err = _call("bpf_map_update_elem", fd, key, value, flags)
    if err:
        _raise(err, "bpf_map_update_elem", _describe_fd(fd, "map"))


def map_delete(fd: int, key: bytes) -> bool:
    """Remove key; False when it was not there."""
    _, err = _call("bpf_map_delete_elem", fd, key)
    if err == errno_codes.ENOENT:
        return False
    if err:
        _raise(err, "bpf_map_delete_elem", _describe_fd(fd, "map"))
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, walked with bpf_map_get_next_key from NULL (the first key)."""
    # Deleting the current key while iterating a hash map makes the kernel restart from the
    # first bucket, so collect keys before deleting them.
    current: ctypes.Array[ctypes.c_char] | None = None
    while True:
        following = ctypes.create_string_buffer(key_size)
        _, err = _call("bpf_map_get_next_key", fd, current, following)
        if err == errno_codes.ENOENT:
            return
        if err:
            _raise(err, "bpf_map_get_next_key", _describe_fd(fd, "map"))
        yield following.raw
        current = following


def map_update_batch(
    fd: int, keys: bytes, values: bytes, count: int, key_size: int, value_size: int,
    flags: int = BPF_ANY,
) -> None:
    """Write count entries in one syscall; keys and values are the packed arrays."""
    if len(keys) != count * key_size or len(values) != count * value_size:
        raise ValueError(
            f"map_update_batch: {count} entries need {count * key_size} key bytes and "
            f"{count * value_size} value bytes, got {len(keys)} and {len(values)}")
    done = ctypes.c_uint32(count)
    opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts), elem_flags=flags, flags=0)
    _, err = _call("bpf_map_update_batch", fd, keys, values, ctypes.byref(done), ctypes.byref(opts))
    if err:
        # On failure the kernel reports how many entries it had written before stopping.
        _raise(err, "bpf_map_update_batch", _describe_fd(fd, "map"),
               detail=f"{done.value} of {count} entries written")


def map_lookup_batch(
    fd: int, key_size: int, value_size: int, batch_entries: int = 4096
) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value), read batch_entries at a time with bpf_map_lookup_batch."""
    return _read_batches("bpf_map_lookup_batch", fd, key_size, value_size, batch_entries)


def map_lookup_array_range(fd: int, first: int, count: int, value_size: int) -> bytes:
    """Values of array-map entries first .. first + count - 1, packed, in one
    bpf_map_lookup_batch: an array's resume token is the key before the first one wanted."""
    token = None if first == 0 else ctypes.create_string_buffer(
        (first - 1).to_bytes(4, sys.byteorder), 8)
    out_token = ctypes.create_string_buffer(8)
    keys = ctypes.create_string_buffer(4 * count)
    values = ctypes.create_string_buffer(value_size * count)
    done = ctypes.c_uint32(count)
    opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts))
    _, err = _call("bpf_map_lookup_batch", fd, token, out_token, keys, values,
                   ctypes.byref(done), ctypes.byref(opts))
    if err and err != errno_codes.ENOENT:
        _raise(err, "bpf_map_lookup_batch", _describe_fd(fd, "map"))
    if done.value != count:
        raise BpfError(errno_codes.ENOENT, "bpf_map_lookup_batch", _describe_fd(fd, "map"),
                       f"read {done.value} of {count} entries from key {first}")
    return values.raw


def map_lookup_and_delete_batch(
    fd: int, key_size: int, value_size: int, batch_entries: int = 4096
) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value), each removed as it is read (hash maps only; arrays cannot delete)."""
    return _read_batches("bpf_map_lookup_and_delete_batch", fd, key_size, value_size,
                         batch_entries)


def _read_batches(
    func_name: str, fd: int, key_size: int, value_size: int, batch_entries: int
) -> Iterator[tuple[bytes, bytes]]:
    # The resume token is opaque: a u32 bucket index for hash maps, a key for arrays.
    token_size = max(key_size, 8)
    in_token: ctypes.Array[ctypes.c_char] | None = None
    while True:
        out_token = ctypes.create_string_buffer(token_size)
        keys = ctypes.create_string_buffer(key_size * batch_entries)
        values = ctypes.create_string_buffer(value_size * batch_entries)
        count = ctypes.c_uint32(batch_entries)
        opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts))
        _, err = _call(func_name, fd, in_token, out_token, keys, values,
                       ctypes.byref(count), ctypes.byref(opts))
        if err == errno_codes.ENOSPC and count.value == 0:
            # One hash bucket holds more entries than fit in a batch: retry bigger.
            batch_entries *= 2
            continue
        if err and err != errno_codes.ENOENT:
            _raise(err, func_name, _describe_fd(fd, "map"))
        key_bytes, value_bytes = keys.raw, values.raw
        for i in range(count.value):
            yield (key_bytes[i * key_size:(i + 1) * key_size],
                   value_bytes[i * value_size:(i + 1) * value_size])
        if err == errno_codes.ENOENT:
            return  # ENOENT marks the last batch, which may still carry entries
        in_token = out_token


def map_delete_batch(fd: int, keys: bytes, count: int, key_size: int) -> int:
    """Delete count packed keys in as few syscalls as the map allows; returns how many were
    there. A key already gone (an LRU map evicts on its own) is skipped, not an error."""
    if len(keys) != count * key_size:
        raise ValueError(f"map_delete_batch: {count} keys need {count * key_size} bytes, "
                         f"got {len(keys)}")
    buffer = ctypes.create_string_buffer(keys, len(keys))
    opts = _MapBatchOpts(sz=ctypes.sizeof(_MapBatchOpts))
    deleted = start = 0
    while start < count:
        done = ctypes.c_uint32(count - start)
        _, err = _call("bpf_map_delete_batch", fd, ctypes.byref(buffer, start * key_size),
                       ctypes.byref(done), ctypes.byref(opts))
        deleted += done.value
        start += done.value
        if err == errno_codes.ENOENT:
            start += 1  # the kernel stops at the first missing key: step over it
        elif err:
            _raise(err, "bpf_map_delete_batch", _describe_fd(fd, "map"),
                   detail=f"{deleted} of {count} keys deleted")
    return deleted


@functools.cache
def num_possible_cpus() -> int:
    """CPUs the kernel may ever bring up: the length of every per-CPU map value array."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    total = 0
    for part in text.split(","):  # e.g. "0-1" or "0,2-5"
        first, _, last = part.partition("-")
        total += (int(last) if last else int(first)) - int(first) + 1
    return total


def percpu_value_size(value_size: int) -> int:
    """Bytes a per-CPU map value takes in a syscall: each CPU's slot is padded to 8 bytes."""
    return ((value_size + 7) // 8 * 8) * num_possible_cpus()


def percpu_lookup(fd: int, key: bytes, value_size: int) -> list[bytes] | None:
    """One value per possible CPU (index = CPU number), or None when the key is absent."""
    slot = (value_size + 7) // 8 * 8
    raw = map_lookup(fd, key, percpu_value_size(value_size))
    if raw is None:
        return None
    return [raw[cpu * slot:cpu * slot + value_size] for cpu in range(num_possible_cpus())]


class MapHandle:
    """An open map whose key and value sizes come from the kernel, so buffers always fit.
    Whole-map reads and deletes use batch syscalls where the kernel has them for the map's
    type, and fall back to one syscall per key where it has not."""

    def __init__(self, fd: int, path: str | None = None) -> None:
        self.fd = fd
        self.path = path
        self.info = map_info(fd)

    @classmethod
    def open(cls, path: PathLike) -> MapHandle:
        fd = obj_get(path)
        try:
            return cls(fd, os.fsdecode(path))
        except BaseException:
            close(fd)
            raise

    @property
    def key_size(self) -> int:
        return self.info.key_size

    @property
    def value_bytes(self) -> int:
        """One value as syscalls carry it: value_size, or every CPU's padded slot (per-CPU)."""
        return self.info.value_bytes

    def _check(self, what: str, data: bytes, size: int) -> None:
        if len(data) != size:
            raise ValueError(
                f"map {self.info.name!r}: {what} is {len(data)} bytes, the map's is {size}")

    def lookup(self, key: bytes) -> bytes | None:
        self._check("key", key, self.key_size)
        return map_lookup(self.fd, key, self.value_bytes)

    def lookup_percpu(self, key: bytes) -> list[bytes] | None:
        self._check("key", key, self.key_size)
        return percpu_lookup(self.fd, key, self.info.value_size)

    def split_percpu(self, value: bytes) -> list[bytes]:
        """A per-CPU value as syscalls carry it -> one value per possible CPU."""
        self._check("value", value, self.value_bytes)
        slot = (self.info.value_size + 7) // 8 * 8
        return [value[cpu * slot:cpu * slot + self.info.value_size]
                for cpu in range(num_possible_cpus())]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        self._check("key", key, self.key_size)
        self._check("value", value, self.value_bytes)
        map_update(self.fd, key, value, flags)

    def update_batch(self, keys: bytes, values: bytes, count: int, flags: int = BPF_ANY) -> None:
        """count packed keys and values in one syscall."""
        map_update_batch(self.fd, keys, values, count, self.key_size, self.value_bytes, flags)

    def delete(self, key: bytes) -> bool:
        self._check("key", key, self.key_size)
        return map_delete(self.fd, key)

    def keys(self) -> Iterator[bytes]:
        return map_keys(self.fd, self.key_size)

    def items(self, batch_entries: int = 4096) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value): one syscall per batch_entries entries where the kernel can."""
        batches = map_lookup_batch(self.fd, self.key_size, self.value_bytes, batch_entries)
        try:
            first = next(batches, None)
        except BpfError as exc:
            if exc.errno not in BATCH_UNSUPPORTED:
                raise
            yield from self._items_one_by_one()
            return
        if first is not None:
            yield first
            yield from batches

    def _items_one_by_one(self) -> Iterator[tuple[bytes, bytes]]:
        for key in list(self.keys()):
            value = self.lookup(key)
            if value is not None:  # deleted since the walk
                yield key, value

    def delete_keys(self, keys: Iterable[bytes]) -> int:
        """Deletes the keys that are there; returns how many were."""
        wanted = list(keys)
        for key in wanted:
            self._check("key", key, self.key_size)
        if not wanted:
            return 0
        try:
            return map_delete_batch(self.fd, b"".join(wanted), len(wanted), self.key_size)
        except BpfError as exc:
            if exc.errno not in BATCH_UNSUPPORTED:
                raise
        return sum(1 for key in wanted if map_delete(self.fd, key))

    def clear(self, batch_entries: int = 4096) -> int:
        """Deletes every entry of a hash map; returns how many there were."""
        batches = map_lookup_and_delete_batch(self.fd, self.key_size, self.value_bytes,
                                              batch_entries)
        try:
            return sum(1 for _ in batches)
        except BpfError as exc:
            if exc.errno not in BATCH_UNSUPPORTED:
                raise
        return self.delete_keys(list(self.keys()))

    def close(self) -> None:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- programs: test runs ---

@dataclass(frozen=True)
class TestRunResult:
    __test__ = False  # not a pytest test class, despite the name

    retval: int  # for XDP, the verdict: XDP_PASS, XDP_TX, ...
    data_out: bytes
    duration_ns: int  # average per repetition, as the kernel measured it


class XdpMd(ctypes.Structure):
    """struct xdp_md as BPF_PROG_TEST_RUN takes it in ctx_in (UAPI linux/bpf.h)."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


def _test_run(prog_fd: int, data: bytes, out_size: int, repeat: int, flags: int,
              ctx: ctypes.Structure | None, ingress_ifindex: int | None,
              short_hint: str = "") -> TestRunResult:
    """One BPF_PROG_TEST_RUN call: `data` in, up to out_size bytes out, `ctx` as ctx_in."""
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p), data_size_in=len(data),
        data_out=ctypes.cast(data_out, ctypes.c_void_p), data_size_out=out_size,
        repeat=repeat, flags=flags,
    )
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    _, err = _call("bpf_prog_test_run_opts", prog_fd, ctypes.byref(opts))
    if err:
        detail = ""
        if err == errno_codes.ENOSPC:
            detail = f"output of {opts.data_size_out} bytes exceeds data_out_size {out_size}"
        elif err == errno_codes.EINVAL and short_hint:
            detail = short_hint
        elif err == errno_codes.ENODEV and ingress_ifindex:
            detail = f"no interface with ifindex {ingress_ifindex} in this network namespace"
        _raise(err, "bpf_prog_test_run_opts", _describe_fd(prog_fd, "prog"), detail=detail)
    return TestRunResult(
        retval=opts.retval, data_out=data_out.raw[:opts.data_size_out],
        duration_ns=opts.duration,
    )


def prog_test_run(
    prog_fd: int, data: bytes, repeat: int = 1, data_out_size: int | None = None,
    flags: int = 0, ingress_ifindex: int | None = None, meta: bytes = b"",
) -> TestRunResult:
    """Run a loaded program on one packet with BPF_PROG_TEST_RUN.

    ingress_ifindex: run as if the frame arrived there (an interface of the calling thread's
    network namespace, where bpf_fib_lookup then routes); default loopback. meta: XDP metadata
    placed before the frame (data_meta); data_out then starts with the metadata too."""
    # Room for programs that grow the packet (bpf_xdp_adjust_head/tail, encapsulation).
    total = len(meta) + len(data)
    out_size = total + 256 if data_out_size is None else data_out_size
    ctx = None
    if ingress_ifindex is not None or meta:
        # bpf_prog_test_run_xdp (net/bpf/test_run.c) takes data == metadata length, data_meta 0,
        # data_end == the whole input's length and egress_ifindex 0.
        ctx = XdpMd(data=len(meta), data_end=total, data_meta=0,
                    ingress_ifindex=ingress_ifindex or 0, rx_queue_index=0, egress_ifindex=0)
    short = "XDP test runs need at least an Ethernet header (14 bytes)" if len(data) < 14 else ""
    return _test_run(prog_fd, meta + data, out_size, repeat, flags, ctx, ingress_ifindex, short)


class SkBuffCtx(ctypes.Structure):
    """The head of struct __sk_buff up to ifindex, as a sched_cls test run takes it in ctx_in
    (the kernel reads a shorter context as zeros past its end and refuses the fields it does
    not let a test set, len and the rest before mark among them)."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
    ]


def prog_test_run_skb(prog_fd: int, data: bytes, ingress_ifindex: int, repeat: int = 1) -> TestRunResult:
    """BPF_PROG_TEST_RUN of a sched_cls program (the tc build) on one Ethernet frame, as if it
    arrived on ingress_ifindex (an interface of the calling thread's network namespace)."""
    ctx = SkBuffCtx(ingress_ifindex=ingress_ifindex, ifindex=ingress_ifindex)
    return _test_run(prog_fd, data, len(data) + 256, repeat, 0, ctx, ingress_ifindex,
                     "the kernel refuses a frame shorter than its EtherType's header or "
                     "longer than a page for a socket buffer")


BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1


def prog_test_run_live(prog_fd: int, frame: bytes, ingress_ifindex: int, repeat: int,
                       batch_size: int = 64) -> int:
    """BPF_PROG_TEST_RUN in live-frame mode: frames the program returns XDP_TX or
    XDP_REDIRECT for really leave (a traffic generator). Returns 0, or the errno that ended
    the run (EINTR when a signal stops a long one). No output buffer: the kernel refuses one
    in this mode."""
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data, ctypes.c_void_p), data_size_in=len(frame),
        ctx_in=ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p), ctx_size_in=ctypes.sizeof(ctx),
        repeat=repeat, flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size,
    )
    _, err = _call("bpf_prog_test_run_opts", prog_fd, ctypes.byref(opts))
    return err


# --- XDP attachment (netlink, through libbpf) ---

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LIBBPF_DEBUG = 2
_log_lock = threading.Lock()
_log_sink: list[str] = []  # the capturing call's own list, swapped in under _log_lock


@functools.cache
def _vsnprintf() -> Any:
    libc = ctypes.CDLL(None)
    fn = libc.vsnprintf
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    return fn


def _collect_libbpf_log(level: int, fmt: bytes | None, args: int | None) -> int:
    # libbpf logs the kernel's netlink extack ("Kernel error message: ...") instead of
    # returning it; we keep the text for the BpfError. Forwarding a va_list to vsnprintf
    # as a plain pointer is right on x86_64 and arm64, where va_list is passed by reference.
    if level == _LIBBPF_DEBUG or fmt is None:
        return 0
    buf = ctypes.create_string_buffer(1024)
    _vsnprintf()(buf, len(buf), fmt, args)
    _log_sink.append(buf.value.decode(errors="replace").strip())
    return 0


_print_hook = _PRINT_FN(_collect_libbpf_log)  # kept alive: libbpf holds the pointer


@contextmanager
def _captured_libbpf_log() -> Iterator[list[str]]:
    """Route libbpf's log to a list for one call, then give the previous printer back."""
    # bcc shares this libbpf in the agent's process, so the hook is installed only for the
    # duration of our own call, never left behind.
    global _log_sink
    with _log_lock:
        lib = _lib()
        lines: list[str] = []
        _log_sink = lines
        previous = lib.libbpf_set_print(ctypes.cast(_print_hook, ctypes.c_void_p))
        try:
            yield lines
        finally:
            lib.libbpf_set_print(previous)
            _log_sink = []
            for line in lines:
                if "Kernel error message" not in line:
                    print(line, file=sys.stderr)


def _kernel_message(lines: list[str]) -> str:
    for line in lines:
        if "Kernel error message:" in line:
            return "kernel: " + line.split("Kernel error message:", 1)[1].strip()
    return ""


def _mode_text(flags: int) -> str:
    for bit, name in ((XDP_FLAGS_DRV_MODE, "native"), (XDP_FLAGS_SKB_MODE, "generic"),
                      (XDP_FLAGS_HW_MODE, "offload")):
        if flags & bit:
            return name
    return "any mode"


def _iface_text(ifindex: int) -> str:
    try:
        return f"{socket.if_indextoname(ifindex)!r} ifindex {ifindex}"
    except OSError:
        return f"ifindex {ifindex}"


def _iface_exists(ifindex: int) -> bool:
    try:
        socket.if_indextoname(ifindex)
    except OSError:
        return False
    return True


def xdp_attach(
    ifindex: int, prog_fd: int, flags: int = 0, old_prog_fd: int | None = None
) -> None:
    """Attach prog_fd to ifindex (in this thread's network namespace).

    Given old_prog_fd, libbpf adds XDP_FLAGS_REPLACE: the swap is atomic and fails with
    EEXIST if the attached program is no longer that one. libbpf reads 0 as "no old fd",
    any other value (even -1) as one, which is why None maps to 0 here.
    """
    opts = _XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts),
                          old_prog_fd=old_prog_fd or 0)
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_xdp_attach", ifindex, prog_fd, flags, ctypes.byref(opts))
    if err:
        _raise(err, "bpf_xdp_attach", f"{_iface_text(ifindex)}, {_mode_text(flags)}",
               detail=_kernel_message(log))


def xdp_detach(ifindex: int, flags: int = 0, old_prog_fd: int | None = None) -> None:
    """Remove the XDP program attached in the mode flags name (detaching nothing is no error)."""
    opts = _XdpAttachOpts(sz=ctypes.sizeof(_XdpAttachOpts),
                          old_prog_fd=old_prog_fd or 0)
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_xdp_detach", ifindex, flags, ctypes.byref(opts))
    if err:
        _raise(err, "bpf_xdp_detach", f"{_iface_text(ifindex)}, {_mode_text(flags)}",
               detail=_kernel_message(log))


@dataclass(frozen=True)
class XdpQuery:
    attach_mode: int  # XDP_ATTACHED_*
    prog_id: int  # the one program when a single mode is attached, else 0
    drv_prog_id: int
    skb_prog_id: int
    hw_prog_id: int

    @property
    def mode(self) -> str:
        return XDP_ATTACH_MODE_NAMES.get(self.attach_mode, str(self.attach_mode))

    @property
    def attached(self) -> bool:
        return self.attach_mode != XDP_ATTACHED_NONE


def xdp_query(ifindex: int, flags: int = 0) -> XdpQuery:
    """Which XDP programs ifindex carries, by mode."""
    opts = _XdpQueryOpts(sz=ctypes.sizeof(_XdpQueryOpts))
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_xdp_query", ifindex, flags, ctypes.byref(opts))
    if err:
        _raise(err, "bpf_xdp_query", _iface_text(ifindex), detail=_kernel_message(log))
    if opts.attach_mode == XDP_ATTACHED_NONE and not _iface_exists(ifindex):
        # libbpf answers "nothing attached" for an ifindex no interface has.
        _raise(errno_codes.ENODEV, "bpf_xdp_query", f"ifindex {ifindex}")
    return XdpQuery(
        attach_mode=opts.attach_mode, prog_id=opts.prog_id, drv_prog_id=opts.drv_prog_id,
        skb_prog_id=opts.skb_prog_id, hw_prog_id=opts.hw_prog_id,
    )


# --- tc: the ingress hook of the clsact qdisc (`lbctl attach --mode tc`) ---
BPF_TC_INGRESS = 1 << 0
BPF_TC_F_REPLACE = 1 << 0
# The one filter lbctl keeps on a hook, named so that other tools' filters are never touched:
# handle 0x1bc1 ("lbctl"), priority 1 (the first to run).
TC_HANDLE = 0x1BC1
TC_PRIORITY = 1


def _tc_hook(ifindex: int) -> _TcHook:
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=BPF_TC_INGRESS)


def _tc_opts(prog_fd: int = 0, flags: int = 0) -> _TcOpts:
    return _TcOpts(sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=flags,
                   handle=TC_HANDLE, priority=TC_PRIORITY)


def tc_attach(ifindex: int, prog_fd: int, replace: bool = False) -> None:
    """Attach prog_fd (a sched_cls program) as lbctl's direct-action filter on the ingress hook
    of ifindex, creating the clsact qdisc when the interface has none. Without `replace` a
    filter already there under lbctl's handle is an error (EEXIST); with it the swap is one
    netlink change: packets see the old program or the new one."""
    hook = _tc_hook(ifindex)
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_tc_hook_create", ctypes.byref(hook))
    if err and err != errno_codes.EEXIST:
        _raise(err, "bpf_tc_hook_create", f"{_iface_text(ifindex)}, clsact ingress",
               detail=_kernel_message(log))
    opts = _tc_opts(prog_fd, BPF_TC_F_REPLACE if replace else 0)
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_tc_attach", ctypes.byref(hook), ctypes.byref(opts))
    if err:
        _raise(err, "bpf_tc_attach", f"{_iface_text(ifindex)}, tc ingress", detail=_kernel_message(log))


def tc_detach(ifindex: int) -> None:
    """Remove lbctl's filter from the ingress hook (the clsact qdisc stays: other filters may
    use it). Detaching nothing is no error."""
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_tc_detach", ctypes.byref(_tc_hook(ifindex)), ctypes.byref(_tc_opts()))
    if err and err not in (errno_codes.ENOENT, errno_codes.EINVAL):
        _raise(err, "bpf_tc_detach", f"{_iface_text(ifindex)}, tc ingress", detail=_kernel_message(log))


def tc_query(ifindex: int) -> int:
    """The id of the program in lbctl's ingress filter of ifindex, 0 for none."""
    opts = _tc_opts()
    with _captured_libbpf_log() as log:
        _, err = _call("bpf_tc_query", ctypes.byref(_tc_hook(ifindex)), ctypes.byref(opts))
    if err in (errno_codes.ENOENT, errno_codes.EINVAL):
        # No clsact qdisc (EINVAL from the kernel: no such parent) or no filter of ours.
        if not _iface_exists(ifindex):
            _raise(errno_codes.ENODEV, "bpf_tc_query", f"ifindex {ifindex}")
        return 0
    if err:
        _raise(err, "bpf_tc_query", _iface_text(ifindex), detail=_kernel_message(log))
    return int(opts.prog_id)
