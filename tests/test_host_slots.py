"""`HostTier`'s slot bookkeeping under seeded random sequences of what the store does
(puts, bulk puts of chunks read back, runs of new chunks, frees, reservations, putting
a layer in order): every chunk's KV stays in its slot, and the free-slot structures,
the slot table and the misplaced count agree with the slots in use."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.host import HostTier
from storage.layout import KVLayout

LAYOUT = KVLayout(num_layers=1, num_kv_heads=2, head_dim=4, dtype="float32", chunk_size=2)
N = 48  # chunk ids 0..N-1


def kv_of(c: int) -> torch.Tensor:
    """The KV [2, H, C, D] chunk c holds, recognisable."""
    return torch.full((2, 2, 2, 4), float(c)) + torch.arange(4.0)


def check(host: HostTier) -> None:
    used = set(host.slot_of.values())
    assert len(used) == len(host.slot_of), "two chunks in one slot"
    assert host._free_set == set(host._free) and not used & host._free_set
    assert used | host._free_set == set(range(host._next))
    assert host._next <= host.capacity <= host.slab.shape[2]
    assert host._misplaced == sum(s != c for c, s in host.slot_of.items())
    for c in range(min(N, host.slot_table.shape[0])):
        assert int(host.slot_table[c]) == host.slot_of.get(c, -1)
    for c, s in host.slot_of.items():
        assert torch.equal(host.slab[:, :, s], kv_of(c)), (c, s)


OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "many", "run", "free", "reserve", "order", "fill"]),
        st.integers(0, N - 1),
        st.integers(1, 12),
    ),
    max_size=40,
)


@settings(derandomize=True, max_examples=150, deadline=None, database=None)
@given(OPS, st.sampled_from([None, N]))
def test_slots_stay_consistent(ops, max_slots):
    """(With `max_slots`, the model's window in chunks: the slab never grows past it,
    but for a reservation that asks for more.)"""
    host = HostTier(LAYOUT, torch.float32, max_slots=max_slots)
    asked = 0
    for op, c, n in ops:
        absent = [x for x in range(c, min(N, c + n)) if x not in host.slot_of]
        if op == "put" and c not in host.slot_of:
            host.put(c, kv_of(c))
        elif op == "many" and absent:
            order = absent[::-1] if n % 2 else absent  # files come in any order
            host.put_many(order, torch.stack([kv_of(x) for x in order]))
        elif op == "run" and len(absent) == min(N, c + n) - c:
            s0 = host.put_run(c, len(absent))
            if s0 is not None:
                k = torch.stack([kv_of(x)[0] for x in absent], 1).reshape(2, -1, 4)
                v = torch.stack([kv_of(x)[1] for x in absent], 1).reshape(2, -1, 4)
                host.write_run(s0, k, v)
            else:
                for x in absent:
                    host.put(x, kv_of(x))
        elif op == "free":
            for x in range(c, min(N, c + n)):
                if x in host.slot_of:
                    host.free(x)
        elif op == "fill":  # every chunk below c: a layer read back whole, in any order
            rest = [x for x in range(c + 1) if x not in host.slot_of][:: -1 if n % 2 else 1]
            if rest:
                host.put_many(rest, torch.stack([kv_of(x) for x in rest]))
        elif op == "reserve":
            host._reserve(c + n)
            asked = max(asked, c + n)
        elif op == "order" and host.slot_of:
            T = (max(host.slot_of) + 1) * LAYOUT.chunk_size
            done = host.put_in_order(T)
            assert done == (len(host.slot_of) == max(host.slot_of) + 1)
            if done:
                assert host.in_order(T) and host._misplaced == 0
        check(host)
        assert max_slots is None or host.capacity <= max(max_slots, asked)
    if max_slots is not None and asked <= max_slots:  # reserved: it grew where it is
        assert host.reserved is not None and host.slab.shape[2] == max_slots


def test_copy_out_follows_rows_and_slots():
    """Runs are copied whole only where both the slots and the rows run on."""
    host = HostTier(LAYOUT, torch.float32)
    data = torch.randn(8, 2, 2, 2, 4)
    for c in [0, 1, 2, 3, 6, 7, 5, 4]:  # 4 and 5 in swapped slots
        host.put(c, data[c])
    chunks, rows = [0, 1, 2, 3, 4, 5, 6], [0, 2, 3, 4, 5, 6, 8]
    out = torch.zeros(9, 2, 2, 2, 4)
    host.copy_out(chunks, out, rows)
    for c, r in zip(chunks, rows, strict=True):
        assert torch.equal(out[r], data[c])
    assert not out[[1, 7]].any()


def test_an_outgrown_pinned_slab_outlives_the_device_reads_queued_on_it():
    """On CUDA the device gathers rows straight from the pinned slab (its UVA view), later
    than the host asks; when the slab grows, the old one is unregistered and freed only
    after those reads (emulated, the race check sees a free before them)."""
    import storage.host
    from tests.conftest import on_cuda

    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=16, dtype="float32", chunk_size=2)
    with on_cuda():  # (its `device_view`, emulated where there is no GPU)
        host = HostTier(layout, torch.float32, pin=True)
        for c in range(3):
            host.put(c, torch.full((2, 2, 2, 16), float(c)))
        assert host.in_order(6)
        ids = torch.tensor([[0, 5], [3, 2]], device="cuda")
        got = host.gather_in_order(ids, storage.host.device_view(host.slab, ids.device))
        for c in range(3, 40):  # the slab grows: the old one goes
            host.put(c, torch.full((2, 2, 2, 16), float(c)))
        assert got[:, :, :, 0].tolist() == [[[0.0, 2.0], [1.0, 1.0]]] * 2


def test_a_reserved_pinned_slab_grows_where_it_is():
    """On CUDA (emulated here) a slab with a largest size is mapped at it once and grows by
    registering the new slots of each (K/V, head) plane: the same address (no copy, no
    step captured again), what it held kept. A copy from the device that spans two
    growths is split at their edge (one memcpy over both is refused, as the driver may);
    the GPU's own gathers read across it. Where the driver refuses to pin more, the slab
    moves to a bigger one, as without a reservation."""
    import pytest

    import storage.host
    import storage.pinning
    from tests.conftest import EMULATED, on_cuda

    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, dtype="float32", chunk_size=16)
    chunk = lambda c: torch.full((2, 2, 16, 64), float(c))  # noqa: E731
    with on_cuda():
        host = HostTier(layout, torch.float32, pin=True, max_slots=40)
        pinned = lambda: len(host.reserved._pieces)  # noqa: E731
        ptr = host.slab.data_ptr()
        for c in range(3):
            host.put(c, chunk(c))
        assert host.capacity == 8 and pinned() == 4  # a registration per plane
        k = torch.arange(3, 21.0, device="cuda").repeat_interleave(16)[None, :, None]
        k = k.expand(2, -1, 64).contiguous()
        s0 = host.put_run(3, 18)  # chunks 3..20: past the first growth's edge
        host.write_run(s0, k, k)
        assert host.slab.data_ptr() == ptr and host.capacity >= 21 and host.reserved
        assert pinned() == 8
        for c in range(21):
            assert torch.equal(host.chunk(c), chunk(c)), c
        ids = torch.tensor([[0, 16 * 20], [16 * 7 + 3, 16 * 8]], device="cuda")
        got = host.gather_in_order(ids, storage.host.device_view(host.slab, ids.device))
        assert got[:, :, :, 0].tolist() == [[[0.0, 20.0], [7.0, 8.0]]] * 2
        if EMULATED or not torch.cuda.is_available():  # (on a GPU: the pinning probe's)
            with pytest.raises(RuntimeError, match="cross the edge of a registration"):
                host.slab[0, 0, 6:10].copy_(torch.zeros(4, 16, 64, device="cuda"))
            cudart = storage.pinning._cudart()  # (pages registered are taken)
            assert int(cudart.cudaHostRegister(ptr + 4096, 4096, 3)) != 0

        real = storage.pinning._register
        storage.pinning._register = lambda *a: False  # the driver refuses from now on
        try:
            for c in range(21, 30):
                host.put(c, chunk(c))
        finally:
            storage.pinning._register = real
        assert host.reserved is None and host.slab.data_ptr() != ptr and host.capacity >= 30
        assert host.slab.is_pinned()  # (torch's pinned allocator, after all)
        for c in range(30):
            assert torch.equal(host.slab[:, :, c], chunk(c)), c


def test_a_pinned_slab_grows_ahead_of_need_on_another_thread(monkeypatch):
    """Chunks put one by one (a decode) find their slots pinned already: once 7/8 of a
    reserved pinned slab is used, its next growth runs on the `ahead` thread (here run
    to its end at once), so after the first none runs on the thread that puts."""
    import threading

    from tests.conftest import count_slab_growths, on_cuda

    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, dtype="float32", chunk_size=16)
    grown = count_slab_growths(monkeypatch)

    def ahead(fn):
        thread = threading.Thread(target=fn, name="offload-grow")
        thread.start()
        thread.join()

    with on_cuda():
        host = HostTier(layout, torch.float32, pin=True, max_slots=60)
        host.ahead = ahead
        for c in range(60):
            host.put(c, torch.full((2, 2, 16, 64), float(c)))
        assert host.capacity == 60 and host.reserved is not None
        assert len(grown) > 3 and grown[0] == threading.current_thread().name
        assert set(grown[1:]) == {"offload-grow"}, grown
        for c in range(60):
            assert torch.equal(host.slab[:, :, c], torch.full((2, 2, 16, 64), float(c)))


def test_a_device_write_of_every_slot_of_its_planes_copies_plane_by_plane():
    """Every slot of a reserved pinned slab written from the device at once: the (K/V,
    head) planes of a K or V are then one contiguous range, but each is a registration of
    its own, which one memcpy may not cross (the driver refuses it; the emulator too)."""
    from tests.conftest import on_cuda

    layout = KVLayout(num_layers=1, num_kv_heads=2, head_dim=64, dtype="float32", chunk_size=16)
    with on_cuda():
        host = HostTier(layout, torch.float32, pin=True, max_slots=8)
        kv = (
            torch.arange(2 * 2 * 128, dtype=torch.float32).view(2, 2, 128, 1).expand(-1, -1, -1, 64)
        )
        kv = kv.contiguous().cuda()
        host.write_run(host.put_run(0, 8), kv[0], kv[1])
        assert host.slab.shape[2] == 8 and host.capacity == 8
        for c in range(8):
            assert torch.equal(host.chunk(c), kv[:, :, 16 * c : 16 * (c + 1)].cpu()), c
