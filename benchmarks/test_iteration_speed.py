"""Micro-benchmarks of ONE distillation iteration of each iterative method, for fine speed tracking.

    .venv/bin/pytest benchmarks/test_iteration_speed.py --benchmark-only --benchmark-autosave \
        [--benchmark-columns=min,median,max,rounds] [--benchmark-compare]

``--benchmark-autosave`` stores the results, with machine info, under ``.benchmarks/`` (git-ignored); compare
two saved runs with ``pytest-benchmark compare``. ``make test`` does not collect this file (``testpaths`` is
``tests``).

Setting: digits, ipc 10, ConvNet, each method's quick recipe (``quick=True`` on top of the paper recipe the
harness picks for digits ipc 10, if any), distillation seed 0 (the harness's generator), CPU, an expert cache
in a temporary folder shared by the whole module (APM trains its teachers, MTT its experts and TESLA reuses
them; all on first use, before any timed round).

How one iteration is timed: the real ``method.distill(ctx)`` runs in a background thread whose ``_report`` hook
(called by ``ctx.report`` once per iteration) blocks until released. The method is built with exactly
``1 + warmup + rounds`` iterations; iteration 0 (which includes the setup: experts, initial images) completes
before the benchmark starts, and each benchmarked call releases the distillation for one iteration and waits for
its report — one genuine iteration plus a thread handoff of microseconds. Afterwards the thread is released,
joined, and must have finished without an exception (an exception in the thread fails the round that waits on
it, chained). The timings are those of the method's whole iteration, including the loss's ``float()`` in
``ctx.report`` but no harness meter, progress bar or FLOP counting.

APM: its work repeats every ``iteration_period`` = ``mid_gap + 1`` iterations, and the first iteration of every
period trains a new student (long) while the others only take an image step (short). Its warm-up and timed
rounds are whole periods (starting at a period boundary), so the rounds alternate one long and ``mid_gap``
short iterations: the *mean* is the average iteration (the harness's FLOPs-per-iteration basis), the *min* and
*median* a short one, the *max* a long one. The other methods' period is 1.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch

from bench.data import load_dataset
from bench.distilled import DistilledSet
from bench.registry import create_method, default_recipe
from bench.seeding import generator_for
from methods.base import DistillContext

METHODS = ["apm", "mtt", "tesla", "dc", "dsa", "dm"]
DATASET, IPC, ARCH, SEED, QUICK = "digits", 10, "convnet", 0, True
DEVICE = torch.device("cpu")
WARMUP, ROUNDS = 2, 10  # at least; rounded up to whole iteration periods
FIRST_REPORT_TIMEOUT_S = 900  # setup + iteration 0: includes training experts on first use
STEP_TIMEOUT_S = 300
FINISH_TIMEOUT_S = 300


class SteppedDistillation:
    """``method.distill(ctx)`` in a background thread that pauses after every reported iteration."""

    def __init__(self, method, ctx: DistillContext):
        self.method, self.ctx = method, ctx
        ctx._report, ctx._start = self._report, self._start
        self._go = threading.Semaphore(0)  # released by the benchmark: run one more iteration
        self._reported = threading.Semaphore(0)  # released by the thread: an iteration reported (or it ended)
        self._free = False  # set at the end: iterations run without pausing
        self.announced: int | None = None
        self.reports = 0
        self.result: DistilledSet | None = None
        self.error: BaseException | None = None
        self.finished = False
        self.thread = threading.Thread(target=self._run, name=f"distill-{method.name}", daemon=True)

    def _start(self, total: int) -> None:
        self.announced = total

    def _report(self, iteration: int, losses: dict[str, float]) -> None:
        self.reports += 1
        if self._free:
            return
        self._reported.release()
        self._go.acquire()

    def _run(self) -> None:
        try:
            self.result = self.method.distill(self.ctx)
        except BaseException as exc:  # handed to the waiting round / to finish()
            self.error = exc
        finally:
            self.finished = True
            self._reported.release()

    def _wait(self, timeout: float) -> None:
        if not self._reported.acquire(timeout=timeout):
            raise TimeoutError(f"{self.method.name}: no iteration reported within {timeout} s")
        if self.finished:
            if self.error is not None:
                raise RuntimeError(f"{self.method.name}: the distillation raised") from self.error
            raise RuntimeError(f"{self.method.name}: the distillation finished; no iteration left to time")

    def begin(self) -> None:
        """Start the thread and wait until iteration 0 (with all of the method's setup) has been reported."""
        self.thread.start()
        self._wait(FIRST_REPORT_TIMEOUT_S)

    def step(self) -> None:
        """The benchmarked call: exactly one more iteration."""
        self._go.release()
        self._wait(STEP_TIMEOUT_S)

    def finish(self) -> DistilledSet:
        """Let the distillation run to its end (unpaused), join the thread, re-raise its exception if any."""
        self._free = True
        self._go.release()
        self.thread.join(FINISH_TIMEOUT_S)
        if self.thread.is_alive():
            raise TimeoutError(f"{self.method.name}: the distillation thread did not finish in {FINISH_TIMEOUT_S} s")
        if self.error is not None:
            raise RuntimeError(f"{self.method.name}: the distillation raised") from self.error
        assert self.result is not None
        return self.result


def _whole_periods(n: int, period: int) -> int:
    return period * math.ceil(n / period)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One expert cache for the module: MTT's experts are trained once and reused by TESLA."""
    return str(tmp_path_factory.mktemp("ddbench-expert-cache"))


@pytest.fixture(scope="module")
def datasets():
    """digits, loaded once per transform (keyed by ``zca``)."""
    loaded: dict[bool, object] = {}

    def get(zca: bool):
        if zca not in loaded:
            loaded[zca] = load_dataset(DATASET, None, zca=zca, device=DEVICE)
        return loaded[zca]

    return get


@pytest.mark.parametrize("name", METHODS)
def test_one_iteration(benchmark, name, cache_dir, datasets):
    recipe = default_recipe(name, DATASET, IPC)
    spec = f"{name}.{recipe}" if recipe else name
    probe = create_method(spec, quick=QUICK)
    period = max(1, probe.iteration_period)
    warmup, rounds = _whole_periods(WARMUP, period), _whole_periods(ROUNDS, period)
    iterations = 1 + warmup + rounds  # iteration 0 before the benchmark, then one per (warm-up) round
    method = create_method(spec, quick=QUICK, iterations=iterations)
    assert method.iteration_period == period

    dataset = datasets(bool(getattr(method.config, "zca", False)))
    ctx = DistillContext(
        dataset=dataset,
        ipc=IPC,
        arch=ARCH,
        generator=generator_for(SEED, "distill", dataset.name, str(IPC)),  # as the harness derives it
        device=DEVICE,
        quick=QUICK,
        cache_dir=cache_dir,
    )
    run = SteppedDistillation(method, ctx)

    benchmark.group = "iteration"
    benchmark.extra_info.update(
        method=name, spec=spec, recipe=recipe, quick=QUICK, dataset=DATASET, ipc=IPC, arch=ARCH, seed=SEED,
        device=str(DEVICE), torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
        iterations=iterations, warmup_rounds=warmup, rounds=rounds, iteration_period=period,
    )

    run.begin()
    try:
        benchmark.pedantic(run.step, rounds=rounds, iterations=1, warmup_rounds=warmup)
    finally:
        distilled = run.finish()

    assert run.announced == iterations
    assert run.reports == iterations
    assert distilled.images.shape[0] == IPC * dataset.num_classes
    assert torch.isfinite(distilled.images).all()
