"""The CPU threads of `model.threads = 0` (offload/cores.py)."""

import pytest
import torch

from offload import cores


class ScriptedMachine:
    """`cores.cpu_sample` of a machine whose cores' and our process's work per sample
    window follow a script: each window, the busy share of each core and our cores."""

    def __init__(self, windows):
        self.windows = list(windows)
        self.cores, self.own, self.clock, self.last = None, 0.0, 0.0, 0.0

    def sample(self, me):
        if self.cores is None:  # the mark before the first window
            self.cores = [(0.0, 0.0)] * len(self.windows[0][0])
        else:
            busy, own = self.windows.pop(0)
            self.cores = [
                (b + share, t + 1.0) for (b, t), share in zip(self.cores, busy, strict=True)
            ]
            self.own += own * (self.clock - self.last)
        self.last = self.clock
        return list(self.cores), self.own

    def monotonic(self):
        return self.clock


@pytest.mark.parametrize(
    "allowed, quota, want",
    [
        (None, None, [3, 3, 4, 4, 2]),
        ({0, 1}, None, [1, 2, 2, 2, 2]),  # cores 2 and 3 are not ours: nor is their work
        (None, 2, [2, 2, 2, 2, 2]),  # a container's quota of 2 CPUs
    ],
)
def test_threads_follow_the_cores_other_processes_leave(monkeypatch, allowed, quota, want):
    """`model.threads = 0`: one thread per core that others leave free, at the start and
    then over each second of a request, within the cores we may use (affinity, quota);
    our own work is not another's."""
    machine = ScriptedMachine([
        ([1.0, 0.0, 0.0, 0.0], 0.0),  # the start: another process on one core
        ([1.0, 1.0, 1.0, 1.0], 3.0),  # our 3 threads and that process
        ([1.0, 1.0, 1.0, 0.2], 3.0),  # it ended
        ([1.0, 1.0, 1.0, 1.0], 4.0),
        ([1.0, 1.0, 1.0, 1.0], 2.0),  # two more processes started (2 cores of theirs)
    ])  # fmt: skip
    monkeypatch.setattr(cores, "cpu_sample", machine.sample)
    monkeypatch.setattr(cores, "monotonic", machine.monotonic)
    monkeypatch.setattr(cores, "sleep", lambda s: None)
    monkeypatch.setattr(cores, "allowed_cores", lambda: allowed)
    monkeypatch.setattr(cores, "cpu_quota", lambda: quota)
    before = torch.get_num_threads()
    try:
        watch = cores.CoreWatch().start()
        threads = [torch.get_num_threads()]
        assert watch.threads == threads[0]
        machine.clock = 0.5
        watch.check()  # within the second: no sample
        assert len(machine.windows) == 4
        for _ in range(4):
            machine.clock += cores.THREADS_CHECK_SECONDS
            watch.check()
            threads.append(torch.get_num_threads())
        assert threads == want
    finally:
        torch.set_num_threads(before)


def test_free_cores_counts_other_processes_work_not_ours():
    assert cores.free_cores([0.0, 0.0], 0.0) == 2
    assert cores.free_cores([100.0, 0.0], 0.0) == 1
    assert cores.free_cores([100.0, 0.0], 1.0) == 2  # that core was ours
    assert cores.free_cores([55.0, 50.0], 1.0) == 2  # ours moved between the cores
    assert cores.free_cores([60.0, 60.0, 10.0, 0.0], 0.0) == 3  # 1.3 cores: one taken
    assert cores.free_cores([60.0, 60.0, 40.0, 0.0], 0.0) == 2  # 1.6 cores: two taken
    assert cores.free_cores([60.0, 60.0, 40.0, 0.0], 0.2) == 3  # 1.4 of them others'
    assert cores.free_cores([100.0, 100.0], 0.0) == 1


@pytest.mark.parametrize(
    "files, want",
    [
        ({"cgroup": "0::/job\n", "job/cpu.max": "250000 100000\n"}, 3),  # v2: 2.5 CPUs
        ({"cgroup": "0::/\n", "cpu.max": "max 100000\n"}, None),  # v2, no quota
        (
            {
                "cgroup": "4:memory:/x\n1:cpu,cpuacct:/job\n",
                "cpu,cpuacct/job/cpu.cfs_quota_us": "400000\n",
                "cpu,cpuacct/job/cpu.cfs_period_us": "100000\n",
            },
            4,
        ),  # v1
        ({"cgroup": "1:cpu:/\n", "cpu/cpu.cfs_quota_us": "-1\n"}, None),  # v1, no quota
        ({"cgroup": "0::/gone\n"}, None),  # no such files
        ({"cgroup": "\nnot a cgroup line\n0::/\n", "cpu.max": "150000 100000"}, 2),
    ],
)
def test_a_cgroups_cpu_quota_caps_the_threads(tmp_path, files, want):
    for name, text in files.items():
        path = tmp_path / "fs" / name if name != "cgroup" else tmp_path / "cgroup"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cores.cpu_quota(tmp_path / "fs", tmp_path / "cgroup") == want
    assert cores.cpu_quota(tmp_path / "fs", tmp_path / "missing") is None


def test_our_threads_make_no_openmp_pool_and_leave_other_threads_theirs():
    """A thread of ours that runs a parallel operation does not start OpenMP threads of
    its own (while it lived, they slowed the main thread's every operator: storage/
    threads.py); a thread started after it still gets torch's thread count."""
    import os
    import threading

    from storage import threads

    def os_threads() -> int:
        return len(os.listdir("/proc/self/task"))

    was = torch.get_num_threads()
    torch.set_num_threads(2)  # (what a new thread starts with)
    try:
        big = torch.randn(1024, 1024)
        with threads.pool(1, "offload-test") as pool:
            assert pool.submit(torch.get_num_threads).result() == 1
            before = os_threads()
            assert pool.submit(lambda: float(big.abs().sum())).result() > 0
            assert os_threads() == before
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(was)
