"""Kernel tests of xdp.libbpf: pinned maps, batch writes, info, test runs and XDP attach on veth."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xdp import libbpf

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: creates BPF maps and programs")

REPO_ROOT = Path(__file__).resolve().parents[2]
BPFFS = Path("/sys/fs/bpf")
RING_SIZE = 65537  # the default Maglev ring: the size the control plane writes in one go

# The pin path comes in as a -D define so the C text is a constant, not a template.
PROGRAM = rb"""
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>

BPF_TABLE_PINNED("hash", u32, u64, pinned_hash, 16, PIN_PATH);
BPF_ARRAY(ring, u32, 65537);
BPF_PERCPU_ARRAY(percpu_counters, u64, 4);

int xdp_swap_mac(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    unsigned char dest[ETH_ALEN];
    u32 zero = 0;
    u64 *packets;

    if ((void *)(eth + 1) > data_end)
        return XDP_DROP;
    __builtin_memcpy(dest, eth->h_dest, ETH_ALEN);
    __builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
    __builtin_memcpy(eth->h_source, dest, ETH_ALEN);
    packets = percpu_counters.lookup(&zero);
    if (packets)
        *packets += 1;
    return XDP_TX;
}

int xdp_pass_all(struct xdp_md *ctx) {
    return XDP_PASS;
}
"""

DST_MAC = bytes.fromhex("020000000001")
SRC_MAC = bytes.fromhex("020000000002")
FRAME = DST_MAC + SRC_MAC + b"\x08\x00" + bytes(range(46))


@pytest.fixture(scope="module")
def pin_dir() -> Iterator[Path]:
    path = BPFFS / f"tlb-libbpf-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        # Unlinking a pin drops only the name; the map lives while bcc holds its fd.
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def bpf(pin_dir: Path) -> Iterator[Any]:
    from bcc import BPF  # type: ignore[import-untyped]

    program = BPF(text=PROGRAM, cflags=[f'-DPIN_PATH="{pin_dir / "pinned_hash"}"'])
    try:
        yield program
    finally:
        program.cleanup()


@pytest.fixture(scope="module")
def swap_fd(bpf: Any) -> int:
    from bcc import BPF

    return int(bpf.load_func(b"xdp_swap_mac", BPF.XDP).fd)


@pytest.fixture(scope="module")
def pass_fd(bpf: Any) -> int:
    from bcc import BPF

    return int(bpf.load_func(b"xdp_pass_all", BPF.XDP).fd)


@pytest.fixture
def pinned_fd(pin_dir: Path, bpf: Any) -> Iterator[int]:
    fd = libbpf.obj_get(pin_dir / "pinned_hash")
    try:
        yield fd
    finally:
        for key in list(libbpf.map_keys(fd, 4)):
            libbpf.map_delete(fd, key)
        libbpf.close(fd)


def u32(n: int) -> bytes:
    return struct.pack("=I", n)


def u64(n: int) -> bytes:
    return struct.pack("=Q", n)


def packets_counted(percpu_fd: int) -> int:
    """Slot 0 of percpu_counters, summed over CPUs."""
    return sum(struct.unpack("=Q", v)[0] for v in libbpf.percpu_lookup(percpu_fd, u32(0), 8) or [])


def test_pinned_map_reads_and_writes_through_a_plain_fd(bpf: Any, pinned_fd: int) -> None:
    table = bpf[b"pinned_hash"]
    libbpf.map_update(pinned_fd, u32(1), u64(111))
    table[table.Key(2)] = table.Leaf(222)

    assert table[table.Key(1)].value == 111
    assert libbpf.map_lookup(pinned_fd, u32(2), 8) == u64(222)
    assert sorted(libbpf.map_keys(pinned_fd, 4)) == [u32(1), u32(2)]
    assert libbpf.map_lookup(pinned_fd, u32(3), 8) is None

    assert libbpf.map_delete(pinned_fd, u32(1)) is True
    assert libbpf.map_delete(pinned_fd, u32(1)) is False
    assert libbpf.map_lookup(pinned_fd, u32(1), 8) is None
    assert table.get(table.Key(1)) is None


def test_another_process_sees_updates_through_the_pin(pin_dir: Path, pinned_fd: int) -> None:
    libbpf.map_update(pinned_fd, u32(7), u64(0xC0FFEE))
    reader = (
        "import sys; from xdp import libbpf\n"
        "fd = libbpf.obj_get(sys.argv[1])\n"
        "print(libbpf.map_lookup(fd, (7).to_bytes(4, sys.byteorder), 8).hex())\n"
        "libbpf.map_update(fd, (8).to_bytes(4, sys.byteorder), (88).to_bytes(8, sys.byteorder))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", reader, str(pin_dir / "pinned_hash")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert bytes.fromhex(done.stdout.strip()) == u64(0xC0FFEE)
    assert libbpf.map_lookup(pinned_fd, u32(8), 8) == u64(88)


def test_full_hash_map_refuses_a_new_key_with_e2big(pinned_fd: int) -> None:
    for key in range(16):
        libbpf.map_update(pinned_fd, u32(key), u64(key))
    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.map_update(pinned_fd, u32(16), u64(16))
    assert caught.value.errno == errno.E2BIG
    assert "bpf_map_update_elem(map 'pinned_hash' fd" in str(caught.value)


def test_update_batch_writes_a_whole_ring_in_one_call(bpf: Any) -> None:
    fd = bpf[b"ring"].map_fd
    backends = [(slot * 7919) % 251 for slot in range(RING_SIZE)]
    keys = struct.pack(f"={RING_SIZE}I", *range(RING_SIZE))
    values = struct.pack(f"={RING_SIZE}I", *backends)

    libbpf.map_update_batch(fd, keys, values, RING_SIZE, 4, 4)

    for slot in (0, 1, RING_SIZE // 2, RING_SIZE - 1):
        assert libbpf.map_lookup(fd, u32(slot), 4) == u32(backends[slot])
    read_back = dict(libbpf.map_lookup_batch(fd, 4, 4))
    assert len(read_back) == RING_SIZE
    assert read_back[u32(RING_SIZE - 1)] == u32(backends[-1])
    assert b"".join(read_back[u32(slot)] for slot in range(RING_SIZE)) == values


def test_update_batch_rejects_arrays_of_the_wrong_length(bpf: Any) -> None:
    with pytest.raises(ValueError, match="3 entries need 12 key bytes"):
        libbpf.map_update_batch(bpf[b"ring"].map_fd, b"\0" * 8, b"\0" * 12, 3, 4, 4)


def test_update_batch_past_the_end_reports_how_far_it_got(bpf: Any) -> None:
    keys = struct.pack("=3I", 0, RING_SIZE, 1)  # the middle key is out of range
    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.map_update_batch(bpf[b"ring"].map_fd, keys, bytes(12), 3, 4, 4)
    assert caught.value.errno == errno.E2BIG
    assert "1 of 3 entries written" in str(caught.value)


def test_map_info_describes_the_pinned_map(bpf: Any, pinned_fd: int) -> None:
    info = libbpf.map_info(pinned_fd)
    assert (info.name, info.type_name, info.key_size, info.value_size, info.max_entries) == (
        "pinned_hash", "hash", 4, 8, 16)
    # Same kernel object as bcc's own fd, not a copy.
    assert info.id == libbpf.map_info(bpf[b"pinned_hash"].map_fd).id
    ring = libbpf.map_info(bpf[b"ring"].map_fd)
    assert (ring.type_name, ring.max_entries, ring.percpu) == ("array", RING_SIZE, False)
    assert libbpf.map_info(bpf[b"percpu_counters"].map_fd).percpu


def test_map_handle_checks_sizes_against_the_kernel(pin_dir: Path, bpf: Any) -> None:
    with libbpf.MapHandle.open(pin_dir / "pinned_hash") as handle:
        handle.update(u32(5), u64(55))
        assert handle.lookup(u32(5)) == u64(55)
        with pytest.raises(ValueError, match="key is 2 bytes, the map's is 4"):
            handle.lookup(b"\0\0")
        with pytest.raises(ValueError, match="value is 4 bytes, the map's is 8"):
            handle.update(u32(5), u32(55))
        assert handle.delete(u32(5))
    assert handle.fd == -1


def test_obj_get_of_a_missing_pin_names_the_path(pin_dir: Path) -> None:
    missing = pin_dir / "no_such_map"
    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.obj_get(missing)
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value, OSError)
    assert str(caught.value) == f"bpf_obj_get('{missing}'): No such file or directory"


def test_missing_libbpf_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(*args: object, **kwargs: object) -> None:
        raise OSError("libbpf.so.1: cannot open shared object file")

    libbpf._lib.cache_clear()
    monkeypatch.setattr("ctypes.CDLL", no_library)
    try:
        with pytest.raises(libbpf.BpfError) as caught:
            libbpf.obj_get("/sys/fs/bpf/anything")
    finally:
        libbpf._lib.cache_clear()  # the next call loads the real library again
    assert str(caught.value) == "libbpf.so.1 not found; hint: apt-get install libbpf1"


def test_obj_pin_makes_a_second_name_for_the_map(pin_dir: Path, bpf: Any) -> None:
    extra = pin_dir / "ring_again"
    libbpf.obj_pin(bpf[b"ring"].map_fd, extra)
    fd = libbpf.obj_get(extra)
    try:
        assert libbpf.map_info(fd).id == libbpf.map_info(bpf[b"ring"].map_fd).id
    finally:
        libbpf.close(fd)
        extra.unlink()


def test_percpu_lookup_returns_one_value_per_possible_cpu(bpf: Any) -> None:
    fd = bpf[b"percpu_counters"].map_fd
    cpus = libbpf.num_possible_cpus()
    libbpf.map_update(fd, u32(3), b"".join(u64(100 + cpu) for cpu in range(cpus)))

    values = libbpf.percpu_lookup(fd, u32(3), 8)

    assert values == [u64(100 + cpu) for cpu in range(cpus)]
    assert libbpf.percpu_lookup(fd, u32(2), 8) == [u64(0)] * cpus
    assert libbpf.percpu_lookup(fd, u32(4), 8) is None  # past max_entries


def test_num_possible_cpus_matches_the_kernel_list() -> None:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    last = int(text.replace(",", "-").split("-")[-1])
    assert 1 <= libbpf.num_possible_cpus() <= last + 1


def test_test_run_swaps_macs_and_returns_xdp_tx(bpf: Any, swap_fd: int) -> None:
    counters = bpf[b"percpu_counters"].map_fd
    before = packets_counted(counters)

    result = libbpf.prog_test_run(swap_fd, FRAME)

    assert result.retval == libbpf.XDP_TX
    assert result.data_out == SRC_MAC + DST_MAC + FRAME[12:]
    assert packets_counted(counters) == before + 1


def test_test_run_repeated_reports_a_duration(swap_fd: int) -> None:
    result = libbpf.prog_test_run(swap_fd, FRAME, repeat=1000)
    assert result.retval == libbpf.XDP_TX
    assert 0 < result.duration_ns < 1_000_000


def test_test_run_of_a_frame_shorter_than_ethernet_is_refused(swap_fd: int) -> None:
    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.prog_test_run(swap_fd, b"\0" * 10)
    assert caught.value.errno == errno.EINVAL
    assert "bpf_prog_test_run_opts(prog 'xdp_swap_mac'" in str(caught.value)


def test_prog_info_and_run_time_stats(swap_fd: int) -> None:
    info = libbpf.prog_info(swap_fd)
    assert (info.name, info.type) == ("xdp_swap_mac", libbpf.BPF_PROG_TYPE_XDP)
    assert len(info.tag) == 16 and int(info.tag, 16) != 0

    stats_fd = libbpf.enable_run_time_stats()
    try:
        libbpf.prog_test_run(swap_fd, FRAME, repeat=100)
    finally:
        libbpf.close(stats_fd)
    counted = libbpf.prog_info(swap_fd)
    assert counted.run_cnt >= info.run_cnt + 100
    assert counted.run_time_ns > info.run_time_ns

    by_id = libbpf.prog_get_fd_by_id(info.id)
    try:
        assert libbpf.prog_info(by_id).tag == info.tag
    finally:
        libbpf.close(by_id)


@pytest.fixture
def veth_netns() -> Iterator[str]:
    """A fresh network namespace holding a veth pair lb0 <-> lb1, both up; removed afterwards."""
    from pyroute2 import IPRoute, netns  # type: ignore[import-untyped]

    name = f"tlb-libbpf-{secrets.token_hex(4)}"
    netns.create(name)
    try:
        with IPRoute(netns=name) as ipr:
            ipr.link("add", ifname="lb0", kind="veth", peer="lb1")
            for ifname in ("lb0", "lb1"):
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")
        yield name
    finally:
        # Removing the namespace destroys the veth pair and its XDP attachments with it.
        try:
            netns.remove(name)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


@pytest.fixture
def inside_netns(veth_netns: str) -> Iterator[str]:
    """Run the test body in the namespace: netlink calls act on the calling thread's netns."""
    from pyroute2 import netns

    netns.pushns(veth_netns)
    try:
        yield veth_netns
    finally:
        netns.popns()


def test_xdp_attach_query_replace_detach_on_veth(
    inside_netns: str, swap_fd: int, pass_fd: int
) -> None:
    lb0 = socket.if_nametoindex("lb0")
    lb1 = socket.if_nametoindex("lb1")
    swap_id = libbpf.prog_info(swap_fd).id
    pass_id = libbpf.prog_info(pass_fd).id
    assert not libbpf.xdp_query(lb0).attached

    libbpf.xdp_attach(lb0, swap_fd, libbpf.XDP_FLAGS_DRV_MODE | libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
    native = libbpf.xdp_query(lb0)
    assert (native.mode, native.prog_id, native.drv_prog_id, native.skb_prog_id) == (
        "native", swap_id, swap_id, 0)

    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.xdp_attach(
            lb0, pass_fd, libbpf.XDP_FLAGS_DRV_MODE | libbpf.XDP_FLAGS_UPDATE_IF_NOEXIST)
    assert caught.value.errno == errno.EBUSY
    assert str(caught.value) == (
        f"bpf_xdp_attach('lb0' ifindex {lb0}, native): Device or resource busy"
        " (kernel: XDP program already attached)")

    libbpf.xdp_attach(lb0, pass_fd, libbpf.XDP_FLAGS_DRV_MODE | libbpf.XDP_FLAGS_REPLACE,
                      old_prog_fd=swap_fd)
    assert libbpf.xdp_query(lb0).drv_prog_id == pass_id
    with pytest.raises(libbpf.BpfError) as stale:
        libbpf.xdp_attach(lb0, swap_fd, libbpf.XDP_FLAGS_DRV_MODE | libbpf.XDP_FLAGS_REPLACE,
                          old_prog_fd=swap_fd)  # no longer the attached program
    assert stale.value.errno == errno.EEXIST
    assert stale.value.detail == "kernel: Active program does not match expected"

    libbpf.xdp_attach(lb1, swap_fd, libbpf.XDP_FLAGS_SKB_MODE)
    generic = libbpf.xdp_query(lb1)
    assert (generic.mode, generic.skb_prog_id, generic.drv_prog_id) == ("generic", swap_id, 0)

    libbpf.xdp_detach(lb0, libbpf.XDP_FLAGS_DRV_MODE)
    libbpf.xdp_detach(lb1, libbpf.XDP_FLAGS_SKB_MODE)
    assert not libbpf.xdp_query(lb0).attached
    assert libbpf.xdp_query(lb1) == libbpf.XdpQuery(libbpf.XDP_ATTACHED_NONE, 0, 0, 0, 0)


def test_xdp_query_of_a_missing_interface_is_enodev(inside_netns: str) -> None:
    with pytest.raises(libbpf.BpfError) as caught:
        libbpf.xdp_query(999_999)
    assert caught.value.errno == errno.ENODEV


# --- MapHandle: whole-map reads and deletes (batch syscalls, or one per key) ---

BATCH_PROGRAM = b"""
BPF_TABLE("lru_hash", u32, u64, lru_flows, 20000);
BPF_PERCPU_ARRAY(percpu_slots, u64, 8);
BPF_DEVMAP(ports, 4);
"""


@pytest.fixture(scope="module")
def batch_maps() -> Iterator[Any]:
    from bcc import BPF

    program = BPF(text=BATCH_PROGRAM)
    try:
        yield program
    finally:
        program.cleanup()


def _handle(batch_maps: Any, name: bytes) -> libbpf.MapHandle:
    return libbpf.MapHandle(os.dup(batch_maps[name].map_fd))


@pytest.fixture
def lru(batch_maps: Any) -> Iterator[libbpf.MapHandle]:
    with _handle(batch_maps, b"lru_flows") as handle:
        try:
            yield handle
        finally:
            for key in list(handle.keys()):
                handle.delete(key)


def _fill(handle: libbpf.MapHandle, count: int) -> dict[bytes, bytes]:
    entries = {u32(k * 7 + 1): u64(k * 1000) for k in range(count)}
    handle.update_batch(b"".join(entries), b"".join(entries.values()), count)
    return entries


def test_items_reads_every_entry_across_many_batches(lru: libbpf.MapHandle) -> None:
    entries = _fill(lru, 3000)
    read = list(lru.items(batch_entries=64))
    assert len(read) == 3000 and dict(read) == entries


def test_delete_keys_deletes_those_present_and_steps_over_missing_ones(lru: libbpf.MapHandle) -> None:
    entries = _fill(lru, 100)
    present = list(entries)[:50]
    missing = [u32(k * 7 + 2) for k in range(10)]  # never written: the kernel stops at each
    # Missing keys between present ones, and at the end keys deleted earlier in this call.
    mixed = [key for pair in zip(present[:10], missing) for key in pair] + present[10:] + present[:5]

    assert lru.delete_keys(mixed) == 50

    assert dict(lru.items()) == {k: v for k, v in entries.items() if k not in present}
    assert lru.delete_keys([]) == 0


def test_clear_empties_a_hash_map_and_counts_what_it_held(lru: libbpf.MapHandle) -> None:
    _fill(lru, 2500)
    assert lru.clear(batch_entries=128) == 2500
    assert list(lru.items()) == []
    assert lru.clear() == 0


def test_percpu_values_are_every_cpus_slot_and_split_per_cpu(batch_maps: Any) -> None:
    cpus = libbpf.num_possible_cpus()
    with _handle(batch_maps, b"percpu_slots") as slots:
        assert slots.value_bytes == 8 * cpus
        slots.update(u32(3), b"".join(u64(10 + cpu) for cpu in range(cpus)))
        with pytest.raises(ValueError, match=f"value is 8 bytes, the map's is {8 * cpus}"):
            slots.update(u32(3), u64(1))

        read = dict(slots.items())

        assert len(read) == 8
        assert slots.split_percpu(read[u32(3)]) == [u64(10 + cpu) for cpu in range(cpus)]
        assert slots.split_percpu(read[u32(2)]) == [u64(0)] * cpus


def test_a_map_type_without_batch_operations_is_read_and_deleted_key_by_key(batch_maps: Any) -> None:
    with _handle(batch_maps, b"ports") as ports:
        with pytest.raises(libbpf.BpfError) as caught:
            list(libbpf.map_lookup_batch(ports.fd, ports.key_size, ports.value_bytes))
        assert caught.value.errno in libbpf.BATCH_UNSUPPORTED
        assert "no batch operations" in str(caught.value)
        loopback = u32(socket.if_nametoindex("lo"))
        ports.update(u32(0), loopback)
        ports.update(u32(2), loopback)

        assert dict(ports.items()) == {u32(0): loopback, u32(2): loopback}

        assert ports.delete_keys([u32(0), u32(2)]) == 2
        assert list(ports.items()) == []
