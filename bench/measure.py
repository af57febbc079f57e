"""Measurement: wall time and memory peaks of every phase, iteration times, FLOPs, and the environment stamp.

A phase records its wall time, the peak resident set size of this process (the kernel's peak-RSS mark, reset at
the phase's start; a psutil sampler where there is no such mark), and on CUDA the GPU memory the process used
(sampled through NVML) beside the caching allocator's own peaks. A figure that
cannot be measured is null with a reason string — never 0 — so that no table can mistake "not measured" for
"free". Memory sizes are in MB (2**20 bytes), rounded to one decimal.

    phases = {}
    with phase(phases, "distill", device):
        ...
    phases["distill"]  # {"wall_s": 12.3, "cpu_peak_rss_mb": 812.4, "gpu_nvml_peak_mb": None, ...,
                       #  "gpu_reason": "cpu run: no CUDA device"}
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils.flop_counter import flop_registry

from bench import host_allocator

DEFAULT_SAMPLE_INTERVAL_S = 0.01  # NVML (and psutil where needed) 100 times a second
PHASE_FIELDS = ("wall_s", "cpu_peak_rss_mb", "gpu_nvml_peak_mb", "gpu_torch_allocated_peak_mb",
                "gpu_torch_reserved_peak_mb", "gpu_reason")


def _mb(num_bytes: int) -> float:
    return round(num_bytes / 2**20, 1)


# ---------------------------------------------------------------------------------------------------------------
# NVML

@lru_cache(maxsize=1)
def _nvml() -> tuple[Any, str | None]:
    """(pynvml, None) once NVML is initialised — once per process, never shut down — or (None, why not)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return None, f"NVML failed to initialise: {e}"
    return pynvml, None


def gpu_unavailable_reason(device: torch.device | str) -> str | None:
    """None when GPU figures can be measured on ``device``; otherwise why not.

    GPU fields are then null (None) with this reason — never 0.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"{device.type} run: no CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _nvml()[1]


def nvml_handle_for(device: torch.device | str) -> Any:
    """The NVML handle of a torch CUDA device.

    Found by the UUID torch reports for it, which respects CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER ("GPU-…",
    or "MIG-…" for a MIG instance, whose handle is then the MIG device handle); failing that, by the device's
    entry in CUDA_VISIBLE_DEVICES (an index or a GPU-/MIG- UUID); finally by the torch index itself.
    Raises RuntimeError when NVML is unavailable and pynvml.NVMLError when no lookup succeeds.
    """
    pynvml, reason = _nvml()
    if pynvml is None:
        raise RuntimeError(reason)
    device = torch.device(device)
    index = torch.cuda.current_device() if device.index is None else device.index
    candidates: list[str | int] = []
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        candidates += [uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
    except (AttributeError, RuntimeError, AssertionError):
        pass  # an old torch without .uuid, or no CUDA: go by CUDA_VISIBLE_DEVICES
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            candidates.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            candidates.append(entry)
    candidates.append(index)
    error: Exception | None = None
    for candidate in candidates:
        try:
            if isinstance(candidate, int):
                return pynvml.nvmlDeviceGetHandleByIndex(candidate)
            return pynvml.nvmlDeviceGetHandleByUUID(candidate)
        except pynvml.NVMLError as e:
            error = e
    raise error


# ---------------------------------------------------------------------------------------------------------------
# memory

_PEAK_BEFORE_RESETS = 0  # bytes: the largest high-water mark seen before a reset (the reset also clears ru_maxrss)


def _reset_rss_high_water_mark() -> bool:
    """Reset this process's peak-RSS mark (Linux ≥ 4.0: write 5 to /proc/self/clear_refs); False if impossible."""
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, _rss_high_water_mark() or 0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_high_water_mark() is not None
    except OSError:
        return False


def _note_process_peak(num_bytes: int | None) -> None:
    global _PEAK_BEFORE_RESETS
    _PEAK_BEFORE_RESETS = max(_PEAK_BEFORE_RESETS, num_bytes or 0)


def proc_kib_field(path: str, field: str) -> int | None:
    """A ``field: N kB`` line of a Linux ``/proc`` file (``/proc/self/status``, ``/proc/meminfo``) in bytes; None
    where the file or the field is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rss_high_water_mark() -> int | None:
    """VmHWM of this process in bytes: the kernel's exact peak RSS since the last reset."""
    return proc_kib_field("/proc/self/status", "VmHWM")


class MemorySampler:
    """The memory peaks of process ``pid`` (default: this process) between start() and stop().

    CPU: for this process on Linux, the kernel's own peak-RSS mark, reset at start() and read at stop() — exact
    and free (``cpu_peak_source="kernel_high_water_mark"``); otherwise (another process, no /proc) a daemon thread
    samples the resident set size (psutil) every ``interval_s`` (``"sampled"``). GPU: when ``device`` is a CUDA
    device and NVML works, the thread samples the GPU memory used by that process: the process's own entry in NVML's
    list of compute processes (``gpu_nvml_source="process"``), or, where NVML gives none (a MIG instance that does
    not report processes, a container whose PIDs NVML cannot see), the device's used memory minus what was used at
    start() (``"device_minus_baseline"``).

    Use as a context manager or with start()/stop(). stop() is idempotent, joins the thread and takes one last
    sample, so even a phase shorter than the interval has a peak. A sampling error (process gone, NVML error)
    ends that sampling quietly and is kept as a reason string; it never raises into the caller.
    ``thread_cpu_s`` is the CPU time the sampling thread used — the sampler's own overhead.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
                 pid: int | None = None):
        self.device = None if device is None else torch.device(device)
        self.interval_s = interval_s
        self.pid = os.getpid() if pid is None else pid
        self.cpu_reason: str | None = None
        self.gpu_reason: str | None = None
        self.thread_cpu_s: float | None = None
        self._process: psutil.Process | None = None
        self._rss_peak: int | None = None
        self._rss_from_kernel = False
        self._nvml = None
        self._handle = None
        self._by_process = True  # until NVML refuses to list processes
        self._gpu_baseline = 0
        self._gpu_process_peak: int | None = None
        self._gpu_device_peak: int | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._result: dict | None = None

    @property
    def cpu_peak_rss_mb(self) -> float | None:
        """The peak RSS so far, in MB (readable while sampling, e.g. by a parent watching a child)."""
        return None if self._rss_peak is None else _mb(self._rss_peak)

    def start(self) -> MemorySampler:
        if self._started:
            raise RuntimeError("a MemorySampler starts once")
        try:
            self._process = psutil.Process(self.pid)
        except psutil.Error as e:
            self.cpu_reason = f"cannot read process {self.pid}: {e}"
        self.gpu_reason = "no CUDA device to sample" if self.device is None else gpu_unavailable_reason(self.device)
        if self.gpu_reason is None:
            try:
                self._nvml = _nvml()[0]
                self._handle = nvml_handle_for(self.device)
                self._gpu_baseline = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            except Exception as e:
                self._handle, self.gpu_reason = None, f"NVML cannot read {self.device}: {e}"
        self._sample()
        if self._process is not None and self.pid == os.getpid() and _reset_rss_high_water_mark():
            self._rss_from_kernel = True
        self._started = True
        if self._rss_from_kernel and self._handle is None:
            return self  # nothing left to sample periodically: no thread
        self._thread = threading.Thread(target=self._run, name=f"ddbench-memory-sampler-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        """Stop sampling and return the peaks (idempotent)."""
        if self._result is None:
            self._stopping.set()
            if self._thread is not None:
                self._thread.join()
            if self._started:
                self._sample()
            if self._rss_from_kernel:
                mark = _rss_high_water_mark()
                if mark is not None and (self._rss_peak is None or mark > self._rss_peak):
                    self._rss_peak = mark
                # the kernel updates its stored mark lazily (VmHWM reads max(mark, RSS now)); memory that the host
                # allocator hands back after the phase would take this peak out of ru_maxrss
                _note_process_peak(self._rss_peak)
            source = "process" if self._gpu_process_peak is not None else (
                "device_minus_baseline" if self._gpu_device_peak is not None else None)
            gpu_peak = self._gpu_process_peak if source == "process" else self._gpu_device_peak
            if source is None and self.gpu_reason is None:
                self.gpu_reason = "the sampler was never started" if not self._started else (
                    "NVML reported no memory for this process")
            self._result = {
                "cpu_peak_rss_mb": self.cpu_peak_rss_mb,
                "cpu_peak_source": None if self._rss_peak is None else (
                    "kernel_high_water_mark" if self._rss_from_kernel else "sampled"),
                "gpu_nvml_peak_mb": None if gpu_peak is None else _mb(gpu_peak),
                "gpu_nvml_source": source,
                "gpu_reason": self.gpu_reason,  # beside a figure: why sampling ended early
            }
        return dict(self._result)

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        while (self._process is not None or self._handle is not None) and not self._stopping.wait(self.interval_s):
            self._sample()
        self.thread_cpu_s = time.thread_time()

    def _sample(self) -> None:
        if self._process is not None and not self._rss_from_kernel:
            try:
                rss = self._process.memory_info().rss
                if self._rss_peak is None or rss > self._rss_peak:
                    self._rss_peak = rss
            except Exception as e:  # psutil.NoSuchProcess once a watched child has exited
                self._process, self.cpu_reason = None, f"stopped sampling process {self.pid}: {e}"
        if self._handle is not None:
            try:
                self._sample_gpu()
            except Exception as e:
                self._handle, self.gpu_reason = None, f"NVML stopped answering: {e}"

    def _sample_gpu(self) -> None:
        nvml = self._nvml
        if self._by_process:
            try:
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
            except nvml.NVMLError:
                self._by_process = False  # e.g. NOT_SUPPORTED on some MIG set-ups
                processes = []
            for p in processes:
                if p.pid == self.pid and p.usedGpuMemory is not None:
                    if self._gpu_process_peak is None or p.usedGpuMemory > self._gpu_process_peak:
                        self._gpu_process_peak = p.usedGpuMemory
                    return
        used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used - self._gpu_baseline
        if self._gpu_device_peak is None or used > self._gpu_device_peak:
            self._gpu_device_peak = used


def process_peak_rss_mb() -> float:
    """The peak RSS of this process over its whole life (``ru_maxrss``, and the marks seen before the phases reset
    it), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
    return _mb(max(peak, _PEAK_BEFORE_RESETS))


_PEAK_FIELDS = ("cpu_peak_rss_mb", "gpu_nvml_peak_mb", "gpu_torch_allocated_peak_mb", "gpu_torch_reserved_peak_mb")


class _OpenPhase:
    """A phase being measured: it runs in spans, paused while a phase nested in it runs."""

    def __init__(self, device: torch.device, interval_s: float):
        self.device, self.interval_s, self.cuda = device, interval_s, device.type == "cuda"
        self.figures: dict = {**dict.fromkeys(PHASE_FIELDS), "gpu_nvml_source": None, "wall_s": 0.0}
        self.sampler: MemorySampler | None = None
        self.started = 0.0

    def resume(self) -> None:
        host_allocator.keep_freed_memory()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sampler = MemorySampler(self.device, self.interval_s).start()
        self.started = time.perf_counter()

    def pause(self) -> None:
        try:
            if self.cuda:
                torch.cuda.synchronize(self.device)
        finally:
            self.figures["wall_s"] += time.perf_counter() - self.started
            try:
                span = self.sampler.stop() if self.sampler is not None else {}
            finally:
                host_allocator.return_freed_memory()
            if self.cuda:
                span["gpu_torch_allocated_peak_mb"] = _mb(torch.cuda.max_memory_allocated(self.device))
                span["gpu_torch_reserved_peak_mb"] = _mb(torch.cuda.max_memory_reserved(self.device))
            if span.get("gpu_nvml_source") is not None:  # a sampled peak: a spike shorter than this can be missed
                self.figures["gpu_sample_interval_s"] = self.interval_s
            _fold(self.figures, span)


def _fold(figures: dict, span: dict) -> None:
    """Combine one span's figures into a phase's: peaks by maximum, the first reason and source that appear."""
    for key in _PEAK_FIELDS:
        if span.get(key) is not None:
            figures[key] = span[key] if figures.get(key) is None else max(figures[key], span[key])
    for key in ("gpu_reason", "gpu_nvml_source"):
        if figures.get(key) is None and span.get(key) is not None:
            figures[key] = span[key]
    if figures.get("gpu_nvml_peak_mb") is not None and figures.get("gpu_reason") and span.get("gpu_reason") is None:
        figures["gpu_reason"] = None


_OPEN_PHASES: list[_OpenPhase] = []  # the phases being measured in this process, innermost last


@contextmanager
def phase(phases: dict, name: str, device: torch.device | str = "cpu",
          interval_s: float = DEFAULT_SAMPLE_INTERVAL_S) -> Iterator[dict]:
    """Measure the body as phase ``name``: ``phases[name]`` gets wall time and memory peaks.

    The dict has every PHASE_FIELDS key plus ``gpu_nvml_source`` (and ``gpu_sample_interval_s``, NVML's sampling
    interval, where it sampled) and is filled on exit (also when the body raises). On CUDA the device is
    synchronised at the boundaries and the allocator's peaks are reset at the
    start. Phases nest: an outer phase is paused while an inner one runs, so each phase's time and peaks are its
    own (the ``distill`` phase does not include the ``experts`` phase that a method opens inside it). A phase
    name measured twice accumulates: times add up, peaks take the maximum.
    """
    current = _OpenPhase(torch.device(device), interval_s)
    if _OPEN_PHASES:
        _OPEN_PHASES[-1].pause()
    _OPEN_PHASES.append(current)
    current.resume()
    try:
        yield current.figures
    finally:
        try:
            current.pause()
        finally:
            _OPEN_PHASES.pop()
            figures = current.figures
            if name in phases and phases[name].get("wall_s") is not None:
                earlier = phases[name]
                _fold(figures, earlier)
                figures["wall_s"] += earlier["wall_s"]
                figures.update({k: v for k, v in earlier.items() if k not in figures})
            figures["wall_s"] = round(figures["wall_s"], 4)
            phases[name] = figures
            if _OPEN_PHASES:
                _OPEN_PHASES[-1].resume()


# ---------------------------------------------------------------------------------------------------------------
# time and FLOPs

def iteration_stats(durations_s: list[float], warmup: int = 2) -> dict:
    """Median and 90th percentile (linear interpolation) of iteration times after the first ``warmup``.

    When no more than ``warmup`` durations exist, all of them are used.
    """
    kept = list(durations_s)[warmup:] or list(durations_s)
    if not kept:
        return {"median": None, "p90": None, "n": 0}
    return {"median": float(np.median(kept)), "p90": float(np.percentile(kept, 90)), "n": len(kept)}


class _CountingMode(TorchDispatchMode):
    """Runs every op unchanged and adds up torch's FLOP formulas (``torch.utils.flop_counter.flop_registry``) for
    those that have one (convolutions, matrix products, attention — forward and backward). Unlike
    ``FlopCounterMode`` it tracks no module hierarchy and decomposes nothing, so it costs little and cannot change
    what is computed.

    One correction: torch's formula for the weight gradient of a *grouped* convolution ignores the groups and
    counts ``groups`` times the multiply-adds done; here that part is divided by ``groups``, so a seed-batched
    evaluation (grouped convolutions) counts what the same networks count one at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += self._grouped_conv_backward(formula, args, out) if _is_grouped_conv_backward(func, args) \
                else formula(*args, **kwargs, out_val=out)
        return out

    @staticmethod
    def _grouped_conv_backward(formula, args: tuple, out: Any) -> int:
        groups, (input_mask, weight_mask, bias_mask) = args[9], args[10]
        input_part = formula(*args[:10], [input_mask, False, bias_mask], out_val=out)
        weight_part = formula(*args[:10], [False, weight_mask, False], out_val=out) if weight_mask else 0
        return input_part + weight_part // groups


def _is_grouped_conv_backward(func: Any, args: tuple) -> bool:
    return func._overloadpacket is torch.ops.aten.convolution_backward and len(args) >= 11 and args[9] != 1


_COUNTING: list["FlopCounter"] = []  # the counters between start() and stop(), innermost last


def innermost_flop_counter() -> "FlopCounter | None":
    """The counter counting right now, if its mode is the innermost dispatch mode (else None).

    The harness's training loop (``bench.evaluate``) asks at its start: inside a counting window it counts its
    first epoch and, for every later epoch, runs the steps with counting paused and adds the first epoch's
    count — each epoch runs the same operations on the same shapes, so the total is the same (tested), and a
    window that holds a whole network training (APM's student) costs little more than its first epoch."""
    if not _COUNTING:
        return None
    counter = _COUNTING[-1]
    return counter if counter._mode is not None and _get_current_dispatch_mode() is counter._mode else None


class FlopCounter:
    """Counts floating-point operations between start() and stop() (the same FLOP formulas as torch's
    ``FlopCounterMode``: a multiply-add is 2 FLOPs; element-wise ops are not counted).

    start() and stop() may be called from different functions — the mode stays entered in between — but from
    the same thread. stop() returns the total, or None with ``self.reason`` set when counting failed; a failure
    to enter or exit the mode never raises into the measured code. ``paused()`` leaves the mode for a while, and
    ``add(n)`` adds FLOPs counted elsewhere (see ``innermost_flop_counter``).
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._mode: _CountingMode | None = None

    @property
    def total(self) -> int:
        """The FLOPs counted so far (0 when not counting)."""
        return 0 if self._mode is None else int(self._mode.total)

    def add(self, flops: int) -> None:
        if self._mode is not None:
            self._mode.total += flops

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Operations inside run outside the counting mode (only for the innermost mode: see
        ``innermost_flop_counter``)."""
        mode = self._mode
        if mode is None:
            yield
            return
        mode.__exit__(None, None, None)
        try:
            yield
        finally:
            mode.__enter__()

    def start(self) -> None:
        if self._mode is not None:
            return
        try:
            mode = _CountingMode()
            mode.__enter__()
        except Exception as e:
            self.reason = f"the FLOP-counting mode could not be entered: {e!r}"
            return
        self._mode, self.reason = mode, None
        _COUNTING.append(self)

    def stop(self) -> int | None:
        mode, self._mode = self._mode, None
        if mode is None:
            self.reason = self.reason or "FlopCounter.stop() came without a start()"
            return None
        if self in _COUNTING:
            _COUNTING.remove(self)
        try:
            mode.__exit__(None, None, None)
            return int(mode.total)
        except Exception as e:
            self.reason = f"the FLOP-counting mode could not be exited: {e!r}"
            return None


# ---------------------------------------------------------------------------------------------------------------
# environment

# What can change a record's numbers: ``git_dirty`` says whether these differ from ``git_sha`` (edited, or new
# files not yet committed). Results, reports and logs written beside the code do not make it dirty.
CODE_PATHSPECS = (":/bench", ":/methods", ":/benchmarks", ":/pyproject.toml")


CODE_ROOT = Path(__file__).resolve().parent  # git runs here: the checkout ddbench is imported from


@lru_cache(maxsize=None)
def _git(*args: str) -> str | None:
    """``git ARGS`` in the code's checkout, read-only: without ``--no-optional-locks``, ``git status`` rewrites
    the index under ``.git/index.lock``, and a git killed there (by the timeout, or with a killed run) would leave
    the lock behind, and the user's next ``git commit`` refused."""
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args], cwd=CODE_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver() -> str | None:
    pynvml = _nvml()[0]
    if pynvml is None:
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
    except pynvml.NVMLError:
        return None
    return driver.decode() if isinstance(driver, bytes) else driver


def environment_stamp() -> dict:
    """Software, machine and numerics settings for a record (JSON-serialisable)."""
    import timm

    import bench

    cuda = torch.cuda.is_available()
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:  # a build without cuDNN
        cudnn = None
    sha = _git("rev-parse", "HEAD")
    return {
        "ddbench": bench.__version__,
        "git_sha": sha,
        "git_dirty": None if sha is None else bool(_git("status", "--porcelain", "--", *CODE_PATHSPECS)),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "gpu_name": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpu_driver": _gpu_driver(),
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "host_allocator": host_allocator.description(),
    }
