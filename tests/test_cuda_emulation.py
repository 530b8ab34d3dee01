"""CUDA emulated on the CPU (tests/cuda_emulation.py): what it refuses as a GPU would, how
a captured graph replays, and the CUDA-only tests of the suite passing under it.

On a machine with CUDA these are skipped: the CUDA-only tests run there for real."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import EMULATED

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or EMULATED, reason="CUDA is real here (or emulated already)"
)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def emu():
    from tests.cuda_emulation import emulated_cuda

    with emulated_cuda() as e:
        yield e


def test_tensors_of_two_devices_in_one_operation_are_refused(emu):
    from tests.cuda_emulation import DeviceMismatch

    a = torch.arange(6.0, device="cuda").view(2, 3)
    assert a.is_cuda and a.device == torch.device("cuda", 0)
    with pytest.raises(DeviceMismatch, match=r"aten.add.Tensor: tensors on cuda:0 and cpu"):
        a + torch.ones(2, 3)
    with pytest.raises(DeviceMismatch, match=r"t\[tensor indices\] = a CPU tensor"):
        a[torch.tensor([0], device="cuda")] = torch.ones(1, 3)
    # what CUDA takes: a 0-dim host tensor as a scalar, host indices, explicit copies
    assert (a + torch.tensor(1.0)).is_cuda
    assert (
        a[torch.tensor([1])].is_cuda and a.index_select(0, torch.tensor([0], device="cuda")).is_cuda
    )
    host = a.cpu()
    assert not host.is_cuda and host.tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert a.to("cuda") is a and a.to("cuda", copy=True).data_ptr() != a.data_ptr()
    b = torch.empty(2, 3, device="cuda")
    b.copy_(host)
    assert torch.equal(b.cpu(), host)
    before = len(emu.syncs)
    a[0] = torch.ones(3)  # a copy into a view: CUDA waits for it
    assert a[0].tolist() == [1.0] * 3 and len(emu.syncs) == before + 2  # (and .tolist())


def test_host_reads_are_counted_and_refused_where_cuda_refuses_them(emu):
    a = torch.ones(4, device="cuda")
    before = len(emu.syncs)
    assert a.sum().item() == 4 and int(a[0]) == 1
    assert len(emu.syncs) == before + 2 and "_local_scalar_dense" in emu.syncs[-1]
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
            a.sum().item()
        with pytest.raises(RuntimeError, match="pageable"):
            torch.ones(4).to("cuda")  # a copy from pageable memory waits too
        pinned = torch.ones(4).pin_memory()
        assert pinned.is_pinned() and pinned.to("cuda", non_blocking=True).is_cuda
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        with torch.cuda.graph(g):
            a.max().item()


def test_a_replayed_graph_runs_its_device_work_again_with_what_capture_fixed():
    """The tensors' current values are read; a Python number, or a host tensor's value,
    stays as it was at capture. A Triton launch is one node of the graph."""
    import triton
    import triton.language as tl

    from tests.cuda_emulation import emulated_cuda

    @triton.jit
    def add_one(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

    with emulated_cuda():
        x = torch.zeros(4, device="cuda")
        k = torch.empty(4, device="cuda")
        scale = 2
        host_bias = torch.full((4,), 10.0, pin_memory=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = x * scale + host_bias.to("cuda", non_blocking=True)
            add_one[(1,)](y, k, 4, BLOCK=4)
        scale = 100  # noqa: F841  (fixed at capture)
        x.fill_(1.0)
        host_bias.fill_(20.0)  # (pinned memory: the replayed copy reads it again)
        g.replay()
        assert y.tolist() == [22.0] * 4 and k.tolist() == [23.0] * 4


def test_pinned_memory_is_known_by_address_and_its_device_view_aliases_it(emu):
    from storage.host import device_view, pinned_empty

    host = pinned_empty((2, 8), torch.float32)
    assert host.is_pinned() and not torch.zeros(3).is_pinned()
    view = device_view(host, torch.device("cuda"))
    assert view.is_cuda and view.data_ptr() == host.data_ptr()
    view[1].fill_(3.0)
    torch.cuda.synchronize()  # (the fill runs later than the host asks for it)
    assert host[1].tolist() == [3.0] * 8 and host[0].tolist() == [0.0] * 8
    with pytest.raises(AssertionError, match="pinned"):
        device_view(torch.zeros(4), torch.device("cuda"))


def test_device_memory_is_counted_from_allocation_to_free(emu):
    """As torch's allocator counts it (`memory_allocated`, its peak), without its rounding
    or cache: a view adds nothing, a pinned tensor's device view is host memory."""
    from storage.host import device_view, pinned_empty

    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    a = torch.zeros(1000, device="cuda")
    b = a[10:]
    c = (a + 1).to(torch.float16)  # a float32 temporary, then 2,000 bytes
    assert torch.cuda.memory_allocated() - base == 4000 + 2000
    assert torch.cuda.max_memory_allocated() - base == 4000 + 4000 + 2000
    del a
    assert torch.cuda.memory_allocated() - base == 6000  # (the view keeps the storage)
    del b, c
    assert torch.cuda.memory_allocated() == base
    view = device_view(pinned_empty((256,), torch.float32), torch.device("cuda"))
    m = torch.nn.Linear(10, 10).to("cuda")
    assert view.is_cuda and m.weight.is_cuda and torch.cuda.memory_allocated() - base == 4 * 110


def test_a_replay_that_would_use_memory_freed_since_its_capture_is_refused(emu):
    """A graph holds what it allocated (its pool) and only the addresses of the tensors
    it used: on a GPU a replay after one of them was freed reads or writes freed memory."""
    from tests.cuda_emulation import FreedMemory

    x = torch.ones(4, device="cuda")
    out = torch.zeros(4, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = x * 2  # allocated in the capture: the graph's
        out.add_(y)
    held = torch.cuda.memory_allocated()
    del y
    assert torch.cuda.memory_allocated() == held  # (the graph keeps its pool)
    x.fill_(3.0)
    g.replay()
    assert out.tolist() == [8.0] * 4
    del x
    with pytest.raises(FreedMemory, match=r"freed since its capture \(OnCuda \(4,\)"):
        g.replay()


def test_the_cuda_only_tests_pass_under_emulation():
    """The suite's CUDA-only tests (`-m cuda`: graph capture and replay, no host sync in a
    step, pinned slabs read in place, the default config on CUDA with the embedded model;
    not the compiled step's: torch.compile does not take emulated tensors) run their
    CUDA paths here, in a run of their own under OFFLOAD_EMULATE_CUDA=1."""
    env = {**os.environ, "OFFLOAD_EMULATE_CUDA": "1"}
    # (in one process: this test holds one of the suite's workers meanwhile, and workers of
    # its own would each collect the suite again)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m",
           "cuda", "--ignore=tests/test_compiled_step.py", "-rfEs", "--tb=short", "tests"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= 10 and "skipped" not in run.stdout, tail


def test_work_of_two_streams_left_unordered_is_a_race(emu):
    """A GPU runs each stream's work later than the host asks for it, the streams side by
    side: what one writes another may use only once it waits for it (a stream, an event,
    or the host synchronizing in between)."""
    from tests.cuda_races import Race

    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    x = torch.zeros(8, device="cuda")
    with torch.cuda.stream(side), pytest.raises(Race, match="side .* writes .* default writes"):
        x.add_(1)  # (zeros may not have run yet)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        x.add_(1)
        done = torch.cuda.Event()
        done.record()
    with pytest.raises(Race, match="default reads memory that stream side .* writes"):
        x * 2
    main.wait_event(done)
    assert (x * 2).tolist() == [4.0] * 8
    with torch.cuda.stream(side):
        y = x + 1  # reads alone: no race
    with pytest.raises(Race):
        x.add_(1)  # a write while the side stream may still read
    torch.cuda.synchronize()
    x.add_(1)
    assert y.tolist() == [3.0] * 8


def test_the_host_may_touch_pinned_memory_only_once_device_work_on_it_is_done(emu):
    """A kernel reading pinned memory through its device view, or a copy into it, runs
    after the host asked for it: the host must wait before it writes or reads there.
    A Triton kernel touches the bytes its loads and stores address, exactly."""
    import triton
    import triton.language as tl

    from storage.host import device_view, pinned_empty
    from tests.cuda_races import Race

    @triton.jit
    def first_four(src, dst):
        i = tl.arange(0, 4)
        tl.store(dst + i, tl.load(src + i) * 2)

    host = pinned_empty((8,), torch.float32)
    host.fill_(1.0)
    out = torch.empty(4, device="cuda")
    first_four[(1,)](device_view(host, torch.device("cuda")), out)
    host[4:].fill_(5.0)  # bytes the kernel does not read
    with pytest.raises(Race, match="the host writes memory that stream default reads"):
        host[:4].fill_(3.0)
    torch.cuda.current_stream().synchronize()
    host[:4].fill_(3.0)
    back = pinned_empty((4,), torch.float32)
    back.copy_(out, non_blocking=True)  # (no wait: into pinned memory)
    with pytest.raises(Race, match="the host reads memory that stream default writes"):
        back.tolist()
    event = torch.cuda.Event()
    event.record()
    event.synchronize()
    assert back.tolist() == [2.0] * 4 and out.tolist() == [2.0] * 4  # (a copy to the host waits)


def test_freeing_memory_the_device_may_still_use_is_a_race(emu):
    """Pinned memory unregistered while a copy may still read it; a device tensor a side
    stream used, freed without `record_stream` (its allocating stream may get it back at
    once): the race is raised at the next operation."""
    from storage.host import pinned_empty
    from tests.cuda_races import Race

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    host = pinned_empty((16,), torch.float32)
    with torch.cuda.stream(side):
        on_device = host.to("cuda", non_blocking=True)
    torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    with pytest.raises(Race, match="pinned host memory freed while stream side"):
        torch.zeros(1, device="cuda") + 1
    x = torch.ones(8, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_device.copy_(x[:8].repeat(2))
    del x
    with pytest.raises(
        Race, match="device memory freed while stream side .*default, which the allocator"
    ):
        torch.zeros(1, device="cuda") + 1
    x = torch.ones(8, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.record_stream(side)
        on_device.copy_(x.repeat(2))
    del x
    torch.zeros(1, device="cuda") + 1
