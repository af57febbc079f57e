"""bench.measure on the CPU: memory sampling (this process and a child), phases, iteration statistics, FLOPs,
the environment stamp — and the NVML paths against a fake NVML, since a CPU machine has none."""

import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from bench import measure
from bench.measure import (
    PHASE_FIELDS,
    FlopCounter,
    MemorySampler,
    environment_stamp,
    gpu_unavailable_reason,
    iteration_stats,
    nvml_handle_for,
    phase,
    process_peak_rss_mb,
)

MiB = 2**20


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ddbench-memory-sampler")]


def test_phase_sees_a_real_allocation():
    phases: dict = {}
    with phase(phases, "idle"):
        time.sleep(0.2)
    with phase(phases, "alloc"):
        x = torch.ones(50_000_000)  # 200 MB, touched
        time.sleep(0.2)
    del x
    assert set(phases["alloc"]) == {*PHASE_FIELDS, "gpu_nvml_source"}
    assert phases["alloc"]["cpu_peak_rss_mb"] - phases["idle"]["cpu_peak_rss_mb"] >= 150
    assert phases["alloc"]["wall_s"] >= 0.2
    assert process_peak_rss_mb() >= phases["alloc"]["cpu_peak_rss_mb"] - 1


def test_phase_that_raises_is_still_measured():
    """(Its sampler on this process reads the kernel's peak and runs no thread; a sampler's thread stopping when the
    body raises is the next test's.)"""
    phases: dict = {}
    with pytest.raises(ValueError, match="boom"), phase(phases, "broken"):
        time.sleep(0.02)
        raise ValueError("boom")
    figures = phases["broken"]
    assert figures["wall_s"] >= 0.02
    assert figures["cpu_peak_rss_mb"] > 0


@pytest.fixture
def other_process():
    """A process other than this one: a sampler watching it samples from a thread (its own process on Linux reads
    the kernel's high-water mark instead, with no thread to stop)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child.pid
    child.kill()
    child.wait()


def test_sampler_context_manager_stops_when_the_body_raises(other_process):
    sampler = MemorySampler(pid=other_process)
    with pytest.raises(KeyError), sampler:
        assert len(sampler_threads()) == 1  # an AssertionError would escape pytest.raises(KeyError)
        raise KeyError("x")
    assert sampler_threads() == []
    first = sampler.stop()
    assert sampler.stop() == first  # idempotent
    assert first["cpu_peak_rss_mb"] > 0 and first["cpu_peak_source"] == "sampled"


def test_a_sampling_shorter_than_the_interval_still_has_a_peak(other_process):
    sampler = MemorySampler(interval_s=10.0, pid=other_process).start()
    assert len(sampler_threads()) == 1
    started = time.perf_counter()
    figures = sampler.stop()
    assert time.perf_counter() - started < 1.0  # stop() wakes the thread: it does not wait out the interval
    assert figures["cpu_peak_rss_mb"] > 0 and figures["cpu_peak_source"] == "sampled"
    assert sampler_threads() == []


def test_a_phase_shorter_than_the_interval_still_has_a_peak():
    phases: dict = {}
    with phase(phases, "blink", interval_s=10.0):
        pass
    assert phases["blink"]["cpu_peak_rss_mb"] > 0
    assert phases["blink"]["wall_s"] < 1.0


def test_gpu_fields_on_cpu_are_null_with_a_reason_never_zero():
    phases: dict = {}
    with phase(phases, "cpu_only", "cpu"):
        pass
    figures = phases["cpu_only"]
    for key in ("gpu_nvml_peak_mb", "gpu_torch_allocated_peak_mb", "gpu_torch_reserved_peak_mb", "gpu_nvml_source"):
        assert figures[key] is None
    assert isinstance(figures["gpu_reason"], str) and figures["gpu_reason"]
    assert gpu_unavailable_reason("cpu") == "cpu run: no CUDA device"
    if not torch.cuda.is_available():
        assert gpu_unavailable_reason("cuda:0")


def test_sampler_measures_a_child_process_and_survives_its_exit():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.3); b = b'x' * (200 * 2**20); time.sleep(0.5)"]
    )
    sampler = MemorySampler(pid=child.pid).start()
    try:
        time.sleep(0.1)
        before = sampler.cpu_peak_rss_mb
        deadline = time.monotonic() + 10
        while sampler.cpu_peak_rss_mb < before + 150 and time.monotonic() < deadline:
            time.sleep(0.02)  # the peak is readable while the sampler runs
        assert sampler.cpu_peak_rss_mb >= before + 150
    finally:
        child.wait(timeout=10)
    result = sampler.stop()  # the child is gone: sampling ended quietly, its peak is kept
    assert result["cpu_peak_rss_mb"] >= 150
    assert sampler.cpu_reason is not None
    assert sampler_threads() == []


def test_sampler_of_a_missing_process_does_not_raise():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    result = MemorySampler(pid=child.pid).start().stop()
    assert result["cpu_peak_rss_mb"] is None


def test_own_process_needs_no_thread_on_linux_and_a_watched_one_is_sampled_cheaply():
    own = MemorySampler().start()
    if sys.platform == "linux":  # the kernel's high-water mark: exact, and no thread at all
        assert sampler_threads() == []
    assert own.stop()["cpu_peak_source"] in ("kernel_high_water_mark", "sampled")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    try:
        watcher = MemorySampler(pid=child.pid).start()
        time.sleep(0.5)
        result = watcher.stop()
    finally:
        child.wait()
    assert result["cpu_peak_source"] == "sampled" and result["cpu_peak_rss_mb"] > 0
    assert watcher.thread_cpu_s < 0.05 * 0.5  # typically ~1% of one core on a loaded 2-core VM


def test_iteration_stats_drops_the_warmup():
    stats = iteration_stats([10.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0], warmup=2)
    assert stats == {"median": 3.0, "p90": pytest.approx(4.6), "n": 5}


def test_iteration_stats_on_short_lists():
    assert iteration_stats([]) == {"median": None, "p90": None, "n": 0}
    assert iteration_stats([5.0, 7.0]) == {"median": 6.0, "p90": pytest.approx(6.8), "n": 2}
    assert iteration_stats([5.0, 7.0, 3.0]) == {"median": 3.0, "p90": 3.0, "n": 1}


def _begin(counter: FlopCounter) -> None:
    counter.start()


def _end(counter: FlopCounter) -> int | None:
    return counter.stop()


def test_flop_counter_on_a_matmul():
    counter = FlopCounter()
    _begin(counter)
    torch.randn(64, 128) @ torch.randn(128, 32)
    assert _end(counter) == 2 * 64 * 128 * 32
    assert counter.reason is None


def test_flop_counter_on_a_conv_net_forward_and_backward():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(4, 3, 8, 8)
    forward = FlopCounter()
    _begin(forward)
    net(x)
    forward_flops = _end(forward)
    both = FlopCounter()
    _begin(both)
    net(x).square().sum().backward()
    total = _end(both)
    assert forward_flops > 0
    assert total > forward_flops  # the backward pass is counted too


def test_flop_counter_never_raises_into_the_measured_code(monkeypatch):
    assert FlopCounter().stop() is None

    def broken_enter(self):
        raise RuntimeError("no dispatch mode today")

    monkeypatch.setattr(measure._CountingMode, "__enter__", broken_enter)
    counter = FlopCounter()
    counter.start()
    assert counter.stop() is None
    assert "no dispatch mode today" in counter.reason


@pytest.mark.parametrize("protocol_name, batched", [("standard", False), ("soft", False), ("standard", True)])
def test_a_training_inside_a_counting_window_counts_what_counting_every_epoch_counts(monkeypatch, protocol_name, batched):
    """The training loop counts its first epoch and adds it for the others (``innermost_flop_counter``): the
    same total as counting every epoch — DSA on, an uneven last batch, one network or a seed stack — and the
    epoch callbacks are still counted as they run."""
    from bench import evaluate
    from bench.augment import DSA
    from bench.models import create_network
    from bench.seeding import generator_for

    protocol = evaluate.get_protocol(protocol_name).resolve(quick=True, epochs=4, batch_size=7)
    images = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    targets = torch.arange(20) % 10 if protocol.targets == "hard" else torch.randn(20, 10)

    def counted() -> tuple[int, list]:
        def on_epoch(epoch: int, loss: float) -> None:
            if epoch == 2:  # work of its own in one epoch only: counted as it happens, not extrapolated
                torch.randn(16, 16) @ torch.randn(16, 16)

        generators = [generator_for(seed, "evaluate", "convnet") for seed in (0, 1)]
        models = [create_network("convnet[width=8]", 10, 1, 8, g) for g in generators]
        counter = FlopCounter()
        counter.start()
        if batched:
            evaluate.train_networks_batched(models, images, targets, protocol, generators, DSA.for_dataset(True), on_epoch)
        else:
            for model, generator in zip(models, generators):
                evaluate.train_network(model, images, targets, protocol, generator, DSA.for_dataset(True), on_epoch)
        return counter.stop(), [p.detach().clone() for m in models for p in m.parameters()]

    extrapolated, trained = counted()
    monkeypatch.setattr(evaluate, "innermost_flop_counter", lambda: None)  # count every epoch
    every_epoch, trained_again = counted()
    assert extrapolated == every_epoch > 0
    assert all(torch.equal(a, b) for a, b in zip(trained, trained_again))  # pausing changes nothing computed


def test_a_paused_counter_counts_nothing_and_resumes():
    counter = FlopCounter()
    counter.start()
    assert measure.innermost_flop_counter() is counter
    with counter.paused():
        torch.randn(8, 8) @ torch.randn(8, 8)
        assert measure.innermost_flop_counter() is None
    torch.randn(4, 4) @ torch.randn(4, 4)
    counter.add(10)
    assert counter.stop() == 2 * 4 * 4 * 4 + 10
    assert measure.innermost_flop_counter() is None


STAMP_KEYS = {
    "ddbench", "git_sha", "git_dirty", "python", "torch", "timm", "cuda", "cudnn", "gpu_name", "gpu_count",
    "gpu_driver", "cpu_model", "cpu_threads", "cpu_count", "hostname", "platform", "tf32_matmul", "tf32_cudnn",
    "cudnn_deterministic", "cudnn_benchmark", "deterministic_algorithms", "float32_matmul_precision",
}


def test_environment_stamp_keys_and_json():
    stamp = environment_stamp()
    assert STAMP_KEYS <= set(stamp)
    assert json.loads(json.dumps(stamp)) == stamp
    assert stamp["cpu_threads"] == torch.get_num_threads()
    assert isinstance(stamp["cpu_model"], str)
    calls = measure._git.cache_info().misses
    environment_stamp()
    assert measure._git.cache_info().misses == calls  # git ran once per process


def test_the_stamps_git_status_never_writes_the_users_index(tmp_path, monkeypatch):
    """A file touched since the index was written makes a plain ``git status`` rewrite the index (under
    ``.git/index.lock``, which a killed git leaves behind); the stamp's git calls are read-only."""
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "code")
    index = tmp_path / ".git" / "index"
    written = index.stat().st_mtime_ns
    later = written + 5 * 10**9  # a modification time that the index's stat data for the file cannot match
    os.utime(tmp_path / "code.py", ns=(later, later))
    monkeypatch.setattr(measure, "CODE_ROOT", tmp_path)
    assert measure._git.__wrapped__("status", "--porcelain") == ""  # same content: clean
    assert index.stat().st_mtime_ns == written and not (tmp_path / ".git" / "index.lock").exists()


# --- NVML paths against a fake NVML --------------------------------------------------------------------------------

class FakeNVML:
    class NVMLError(Exception):
        pass

    def __init__(self, uuids=("GPU-1111",), indices=(0,)):
        self.uuids, self.indices = set(uuids), set(indices)
        self.processes: list | Exception = []
        self.used = 1000 * MiB
        self.memory_error: Exception | None = None

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.uuids:
            raise self.NVMLError(f"no {uuid}")
        return ("uuid", uuid)

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.indices:
            raise self.NVMLError(f"no {index}")
        return ("index", index)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if isinstance(self.processes, Exception):
            raise self.processes
        return self.processes

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.memory_error:
            raise self.memory_error
        return SimpleNamespace(used=self.used)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device 0 whose torch UUID is 1111, seen through a fake NVML."""
    nvml = FakeNVML()
    monkeypatch.setattr(measure, "_nvml", lambda: (nvml, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="1111"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return nvml


def _sample_while(nvml: FakeNVML, change) -> dict:
    sampler = MemorySampler("cuda:0", interval_s=0.005).start()
    change(nvml)
    time.sleep(0.1)
    return sampler.stop()


def test_fake_nvml_process_figures(fake_gpu):
    import os

    def grow(nvml):
        nvml.processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=1024 * MiB),
                          SimpleNamespace(pid=-1, usedGpuMemory=9999 * MiB)]

    fake_gpu.processes = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=300 * MiB)]
    result = _sample_while(fake_gpu, grow)
    assert result["gpu_nvml_source"] == "process"
    assert result["gpu_nvml_peak_mb"] == 1024.0
    assert result["gpu_reason"] is None


@pytest.mark.parametrize("processes", ["not listed", "no figure", "refused"])
def test_fake_nvml_falls_back_to_device_minus_baseline(fake_gpu, processes):
    import os

    fake_gpu.processes = {
        "not listed": [SimpleNamespace(pid=-1, usedGpuMemory=5 * MiB)],  # a container whose PIDs NVML cannot see
        "no figure": [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)],
        "refused": FakeNVML.NVMLError("Not Supported"),  # a MIG instance that lists no processes
    }[processes]
    result = _sample_while(fake_gpu, lambda nvml: setattr(nvml, "used", 3048 * MiB))
    assert result["gpu_nvml_source"] == "device_minus_baseline"
    assert result["gpu_nvml_peak_mb"] == 2048.0


def test_fake_nvml_error_ends_gpu_sampling_quietly(fake_gpu):
    result = _sample_while(fake_gpu, lambda nvml: setattr(nvml, "memory_error", FakeNVML.NVMLError("gone")))
    assert "gone" in result["gpu_reason"]
    assert result["cpu_peak_rss_mb"] > 0  # CPU sampling carried on
    assert sampler_threads() == []


def test_nvml_handle_prefers_torch_uuid(fake_gpu, monkeypatch):
    assert nvml_handle_for(torch.device("cuda")) == ("uuid", "GPU-1111")
    fake_gpu.uuids = {"MIG-1111"}
    assert nvml_handle_for(torch.device("cuda:0")) == ("uuid", "MIG-1111")


def test_nvml_handle_falls_back_to_cuda_visible_devices_then_index(fake_gpu, monkeypatch):
    fake_gpu.uuids, fake_gpu.indices = {"GPU-2222"}, {0, 3}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-2222,3")
    assert nvml_handle_for("cuda:0") == ("uuid", "GPU-2222")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="9999"))
    assert nvml_handle_for("cuda:1") == ("index", 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-unknown")
    assert nvml_handle_for("cuda:0") == ("index", 0)
    fake_gpu.indices = set()
    with pytest.raises(FakeNVML.NVMLError):
        nvml_handle_for("cuda:0")


def test_nested_phases_are_measured_apart():
    """The outer phase pauses while the inner one runs: its time excludes the inner's, and an allocation made
    and freed inside the inner phase is the inner's peak, not the outer's."""
    phases: dict = {}
    with phase(phases, "outer"):
        time.sleep(0.05)
        with phase(phases, "inner"):
            block = torch.ones(50_000_000)  # ~200 MB
            time.sleep(0.2)
            del block
        time.sleep(0.05)
    outer, inner = phases["outer"], phases["inner"]
    assert 0.08 <= outer["wall_s"] < 0.2 <= inner["wall_s"]
    assert inner["cpu_peak_rss_mb"] >= outer["cpu_peak_rss_mb"] + 150


def test_a_phase_measured_twice_accumulates():
    phases: dict = {}
    for _ in range(2):
        with phase(phases, "experts"):
            time.sleep(0.05)
    assert phases["experts"]["wall_s"] >= 0.1


def test_flop_counter_agrees_with_torchs_flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode

    from bench.models import create_network

    net = create_network("convnet", 10, 1, 28, torch.Generator().manual_seed(0))
    x = torch.randn(5, 1, 28, 28)
    reference = FlopCounterMode(display=False)
    with reference:
        torch.nn.functional.cross_entropy(net(x), torch.arange(5)).backward()
    ours = FlopCounter()
    ours.start()
    torch.nn.functional.cross_entropy(net(x), torch.arange(5)).backward()
    assert ours.stop() == reference.get_total_flops() > 0


def test_process_peak_survives_the_phase_resets():
    phases: dict = {}
    with phase(phases, "big"):
        block = torch.ones(75_000_000)  # ~300 MB
        del block
    with phase(phases, "small"):
        pass
    from bench.measure import process_peak_rss_mb

    assert process_peak_rss_mb() >= phases["big"]["cpu_peak_rss_mb"] > phases["small"]["cpu_peak_rss_mb"] + 200


def test_a_method_that_raises_inside_the_flop_window_leaves_no_counting_mode_behind(tmp_path, monkeypatch):
    """A crash mid-window must not leave the FLOP-counting mode entered: every later computation in the process
    would be counted (and slowed) by it."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from bench.runner import RunRequest, distill_cell, plan
    from methods.base import DistillContext

    request = RunRequest("digits", ["dm"], [1], [], [], tmp_path, quick=True, isolate=False,
                         method_options={"dm": {"iterations": 6, "batch_real": 8}})
    original = DistillContext.report

    def report(self, it, **losses):
        original(self, it, **losses)
        if _get_current_dispatch_mode() is not None:  # inside the window
            raise RuntimeError("simulated crash inside the FLOP-counting window")

    monkeypatch.setattr(DistillContext, "report", report)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_cell(plan(request)[0], request, torch.device("cpu"), {})
    assert _get_current_dispatch_mode() is None
