"""Executors: where the cells of a planned grid run. ``runner.run_planned`` hands an executor the cells of one or
more requests (a suite's) as one pool, gets back each cell's records as the cell finishes, and alone writes them.
An executor reads how to run (``runner.RUN_SETTINGS``) from the first request; each cell runs under its own.

* ``local`` (the default): this machine. Each cell runs in a fresh child process (``runner.run_cell_isolated``),
  or in this process with ``--no-isolate``, one after another. With several CUDA GPUs (and ``--device`` auto or
  cuda), one cell per GPU at a time: a thread per GPU waits on a cell's child process, which sees only that GPU
  (``CUDA_VISIBLE_DEVICES``). On a CPU run, ``--jobs N`` runs N cells side by side, each child with
  ``cores // N`` torch threads: the small networks of distillation barely use a second thread, so two 1-thread
  cells on 2 cores finish in about half the time of two 2-thread cells in a row. Records say ``cells_side_by_side``
  (their wall times are measured beside N − 1 others), and their environment stamp the threads.
* ``ray``: a Ray cluster (``--executor ray --ray-address auto|HOST:PORT``). Every cell is a Ray task in a fresh
  worker process (``max_calls=1``: its memory peaks are its own), asking for one GPU when the run is on CUDA, else
  one CPU (``--ray-num-gpus`` / ``--ray-num-cpus`` override). The task loads the dataset itself, runs
  ``runner.run_cell`` and sends back the records and the distilled set's files as bytes; this process writes them
  under the results folder, so the workers need no shared filesystem. They do need the data at the same
  ``--data-root`` path on every node, and the same ddbench; ``--cache-dir`` should be a shared path, or each node
  trains its own experts. A cell whose method splits into independent parts (APM with ``subgroups = G``:
  ``Method.split``) becomes G part tasks and one task that merges their sets and evaluates the merge — the
  subgroups are distilled in parallel, with the same result as one after another. A task's exception or a dead worker becomes records with status ``failed`` or ``oom``
  (tasks are not retried: ``--resume`` reruns them). ``auto`` connects to a running cluster (``ray start --head``)
  or else starts a local one on 127.0.0.1, shut down at the end; a program that called ``ray.init`` itself keeps
  its session.

Ray is an optional dependency (``pip install 'ddbench[ray]'``), imported only when the ray executor is used.
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import ContextManager, Iterator

import torch

from bench import runner
from bench.data import load_dataset
from bench.distilled import DistilledSet
from bench.errors import UserError
from bench.measure import process_peak_rss_mb
from bench.runner import INTERRUPTED_ERROR, Cell, CellJob, CellTask, RunRequest, _failure, failure_records

EXECUTORS = ("local", "ray")
RAY_MISSING = "the ray executor needs Ray: pip install 'ddbench[ray]'"
RAY_RESOURCES = ("num_cpus", "num_gpus")  # what a cell task may ask for, besides the defaults


def import_ray():
    """The ``ray`` module, or a ``UserError`` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(RAY_MISSING) from None
    return ray


def check_executor(request: RunRequest) -> None:
    """A ``UserError`` for an executor the request cannot use; checked with the other names, before any work."""
    if request.executor not in EXECUTORS:
        raise UserError(f"unknown executor '{request.executor}' (executors: {', '.join(EXECUTORS)})")
    if request.executor != "ray":
        return
    import_ray()
    if not request.isolate:
        raise UserError("--no-isolate runs cells in this process; the ray executor runs each in a Ray worker")
    if request.checkpoint_every is not None:
        raise UserError("checkpoints need the local executor: a Ray task's checkpoints do not outlive its worker")
    if request.ray_address != "auto":
        _host_and_port(request.ray_address)
    if request.device not in ("auto", "cpu") and not request.device.startswith("cuda"):
        raise UserError(f"device '{request.device}' with the ray executor: use auto, cpu or cuda")
    for key, value in request.ray_resources.items():
        if key not in RAY_RESOURCES or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"a Ray task resource is num_cpus or num_gpus, at least 0; got {key}={value}")


def create_executor(request: RunRequest) -> "LocalExecutor | RayExecutor":
    """The request's executor: its ``results(jobs)`` yields (job, records) as cells finish, and its ``in_flight``
    lists the jobs started and not yet returned (Ctrl-C marks them interrupted)."""
    return RayExecutor(request) if request.executor == "ray" else LocalExecutor(request)


def executor_session(executor: str, ray_address: str = "auto") -> ContextManager:
    """What a command running several requests holds around them: one Ray session for all (else nothing)."""
    return ray_session(ray_address) if executor == "ray" else nullcontext()


def check_jobs(request: RunRequest) -> None:
    """A ``UserError`` for a ``--jobs`` the request cannot use; checked with the other names, before any work."""
    if request.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {request.jobs}")
    if request.jobs == 1:
        return
    if request.executor != "local":
        raise UserError("--jobs runs cells side by side on this machine; the ray executor schedules its own tasks")
    if not request.isolate:
        raise UserError("--jobs runs each cell in its own process; it cannot go with --no-isolate")
    if runner.resolve_device(request.device).type != "cpu":
        raise UserError("--jobs is for CPU runs (cells on a GPU run one per GPU at a time); add --device cpu or drop --jobs")


def cpu_threads_per_job(jobs: int) -> int:
    """Each of ``jobs`` side-by-side cells' share of this process's cores (at least one thread)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def _visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs)."""
    count = torch.cuda.device_count()
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return visible[:count] if visible else [str(index) for index in range(count)]


class LocalExecutor:
    """Cells on this machine: one after another, ``jobs`` at a time on a CPU run, or with several CUDA GPUs one per
    GPU at a time."""

    def __init__(self, request: RunRequest):
        self.request = request
        self.in_flight: list[CellJob] = []  # started and not yet returned: Ctrl-C marks them interrupted
        self.teachers: dict[str, torch.nn.Module] = {}  # soft-protocol teachers, shared by in-process cells
        several = request.isolate and request.device in ("auto", "cuda")
        self.gpus = _visible_gpus() if several else []

    def results(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, list[dict]]]:
        """(job, its records) for every job, as each finishes."""
        if len(self.gpus) > 1:
            yield from self._one_per_gpu(jobs)
            return
        if self.request.jobs > 1:
            yield from self._side_by_side(jobs)
            return
        for job in jobs:
            self.in_flight = [job]
            if self.request.isolate:
                records = runner.run_cell_isolated(job.cell, job.request, job.evaluations, job.ids)
            else:
                records = runner.run_cell(job.cell, job.request, job.evaluations, job.ids, self.teachers)
            self.in_flight = []
            yield job, records

    def _one_per_gpu(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, list[dict]]]:
        """Each cell in its own child process on a free GPU; a thread per GPU waits on it."""
        free: queue.Queue[str] = queue.Queue()
        for gpu in self.gpus:
            free.put(gpu)

        def on_a_free_gpu(job: CellJob, stop: threading.Event) -> list[dict]:
            gpu = free.get()
            try:
                return runner.run_cell_isolated(job.cell, job.request, job.evaluations, job.ids, gpu=gpu, stop=stop)
            finally:
                free.put(gpu)

        yield from self._in_threads(jobs, on_a_free_gpu, len(self.gpus), "ddbench-gpu")

    def _side_by_side(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, list[dict]]]:
        """``request.jobs`` cells at a time, each in its own child process with its share of the cores."""
        threads = cpu_threads_per_job(self.request.jobs)

        def with_a_share(job: CellJob, stop: threading.Event) -> list[dict]:
            return runner.run_cell_isolated(job.cell, job.request, job.evaluations, job.ids, threads=threads, stop=stop)

        yield from self._in_threads(jobs, with_a_share, self.request.jobs, "ddbench-cpu")

    def _in_threads(self, jobs: list[CellJob], run_one, workers: int, name: str) -> Iterator[tuple[CellJob, list[dict]]]:
        """``run_one(job, stop)`` for every job on ``workers`` threads, each waiting on a cell's child process; (job,
        records) as each finishes. ``stop`` is set when the run stops: a thread then starting its cell does not."""
        runner._child_context()  # the forkserver, set up once before the threads start children from it
        stop = threading.Event()

        def started(job: CellJob) -> list[dict]:
            self.in_flight.append(job)  # cells a thread took (recorded if stopped); a queued one gets no record
            return run_one(job, stop)

        self.in_flight = []  # before any thread starts appending to it
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        futures = {pool.submit(started, job): job for job in jobs}
        try:
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=runner.SIGNAL_CHECK_S, return_when=FIRST_COMPLETED)
                for future in [f for f in futures if f in done]:  # in the jobs' order when several end together
                    job = futures[future]
                    self.in_flight.remove(job)
                    yield job, future.result()
        except BaseException:  # Ctrl-C (or an error here): drop the queued cells and end the running ones
            pool.shutdown(wait=False, cancel_futures=True)
            with runner.CHILDREN_LOCK:  # no thread's cell starts between the two, to run on unseen
                stop.set()
                for child in list(runner.RUNNING_CHILDREN):
                    child.terminate()
            raise
        pool.shutdown()


def _host_and_port(address: str) -> tuple[str, int]:
    """A running cluster's ``HOST:PORT``, split; a ``UserError`` for anything else."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address expects auto or HOST:PORT (a running cluster's address), got '{address}'")
    return host.strip("[]"), int(port)


@contextmanager
def ray_session(address: str = "auto") -> Iterator[None]:
    """Connected to Ray while inside: to the cluster at ``address``, or with ``auto`` to a running one, else to a
    new local one on 127.0.0.1 without a dashboard. Disconnects (and so stops a local cluster) at the end; a
    session this process already has is used as it is, and kept."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    if address == "auto":
        try:
            ray.init(address="auto")
        except ConnectionError:  # no running cluster
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    else:
        try:  # ray.init would retry for minutes where nothing listens
            socket.create_connection(_host_and_port(address), timeout=10).close()
        except OSError as exc:
            raise UserError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
                            f"`ray start --head` or use --ray-address auto") from None
        ray.init(address=address)
    try:
        yield
    finally:
        ray.shutdown()


def _task_cell(request: RunRequest, task: CellTask) -> Cell:
    """The cell of ``task``, its dataset loaded here (in the worker)."""
    dataset = load_dataset(request.dataset, request.data_root, zca=task.zca, device=runner.resolve_device(request.device))
    return Cell(task.method_spec, task.method, task.ipc, dataset, task.label)


def _ray_part(request: RunRequest, task: CellTask, index: int) -> tuple[DistilledSet, dict]:
    """Part ``index`` of a cell whose method splits (APM's subgroups) as a Ray task: (its raw set, its phases)."""
    cell = _task_cell(request, task)
    part = cell.method.split(cell.ipc, runner.distill_generator(cell, request))[index]
    phases: dict = {}
    distilled = runner.distill_cell(cell, request, runner.resolve_device(request.device), phases, part=part)
    soft = distilled.soft_labels.cpu() if distilled.soft_labels is not None else None
    return DistilledSet(distilled.images.cpu(), distilled.labels.cpu(), soft, distilled.learned_lr,
                        distilled.metadata), phases


def _ray_cell(request: RunRequest, task: CellTask, *parts: tuple[DistilledSet, dict]) -> tuple[list[dict], dict[str, bytes]]:
    """A cell as a Ray task: load the dataset, run the cell in a scratch results folder, and return its records and
    the files of its distilled set (path under the results folder → bytes) for the driver to write. With
    ``parts`` (the results of its ``_ray_part`` tasks, which Ray hands over once they are done), the cell's set is
    their merge rather than a distillation of its own."""
    with tempfile.TemporaryDirectory(prefix="ddbench-cell-") as scratch:
        cell = _task_cell(request, task)
        records = runner.run_cell(cell, replace(request, results_dir=Path(scratch)), task.evaluations, task.ids,
                                  parts=list(parts) if parts else None)
        files = {str(path.relative_to(scratch)): path.read_bytes()
                 for path in sorted(Path(scratch, runner.DISTILLED_DIR).glob("*")) if path.is_file()}
        for record in records:
            record["process_peak_rss_mb"] = process_peak_rss_mb()
            if record.get("distilled_path"):  # where the driver writes it
                record["distilled_path"] = str(Path(request.results_dir) / Path(record["distilled_path"]).relative_to(scratch))
    return records, files


def _write_files(results_dir: Path, files: dict[str, bytes]) -> None:
    """Write a distilled set's files under the results folder, each atomically and the JSON last (as
    ``DistilledSet.save`` does: a reader that finds the JSON finds a complete set)."""
    for name in sorted(files, key=lambda name: name.endswith(".json")):
        path = Path(results_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        partial.write_bytes(files[name])
        os.replace(partial, path)


def _ray_failure(ray, exc: Exception) -> tuple[str, str]:
    """(status, one-line error) of a cell task that returned no records: the task's own exception, or why its
    worker died (``WorkerCrashedError``, Ray's ``OutOfMemoryError``, a lost node …)."""
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException):
        status, error = _failure(exc.cause)
    elif isinstance(exc, ray.exceptions.OutOfMemoryError):
        status, error = "oom", f"{type(exc).__name__}: {exc}"
    elif isinstance(exc, ray.exceptions.TaskCancelledError):
        status, error = "interrupted", INTERRUPTED_ERROR
    else:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    return status, " ".join(error.split())


class RayExecutor:
    """Every cell a Ray task, all submitted at once; records and distilled sets are written here as tasks finish."""

    def __init__(self, request: RunRequest):
        self.request = request
        self.in_flight: list[CellJob] = []  # submitted and not yet returned: Ctrl-C cancels them and marks them

    def results(self, jobs: list[CellJob]) -> Iterator[tuple[CellJob, list[dict]]]:
        """(job, its records) for every job, as its task finishes."""
        if not jobs:
            return
        ray = import_ray()
        with ray_session(self.request.ray_address):
            task_device, resources = self._task_settings(ray)
            remote = ray.remote(max_calls=1, max_retries=0, **resources)(_ray_cell)
            remote_part = ray.remote(max_calls=1, max_retries=0, **resources)(_ray_part)
            tasks, refused, part_tasks = {}, [], []
            for job in jobs:
                request = replace(job.request, device=task_device)
                task = runner.cell_task(job.cell, job.evaluations, job.ids)
                try:
                    parts = job.cell.method.split(job.cell.ipc, runner.distill_generator(job.cell, request))
                except Exception as exc:  # e.g. subgroups that do not divide ipc: the cell's failure, as locally
                    refused.append((job, _failure(exc)))
                    continue
                part_results = [remote_part.remote(request, task, index) for index in range(len(parts or []))]
                part_tasks += part_results
                tasks[remote.remote(request, task, *part_results)] = job
            for job, (status, error) in refused:
                yield job, failure_records(job.cell, job.request, job.evaluations, job.ids, status, error,
                                           crash_peak_rss_mb=None)
            self.in_flight = list(tasks.values())
            pending = list(tasks)
            try:
                while pending:
                    (task,), pending = ray.wait(pending, num_returns=1)
                    job = tasks[task]
                    try:
                        records, files = ray.get(task)
                        _write_files(self.request.results_dir, files)
                    except ray.exceptions.RayError as exc:
                        status, error = _ray_failure(ray, exc)
                        records = failure_records(job.cell, job.request, job.evaluations, job.ids, status, error,
                                                  crash_peak_rss_mb=None)
                    self.in_flight.remove(job)
                    yield job, records
            except BaseException:  # Ctrl-C (or an error here): stop the tasks still queued or running
                for task in pending + part_tasks:
                    ray.cancel(task, force=True)
                raise

    def _task_settings(self, ray) -> tuple[str, dict]:
        """The device the tasks run on, and the resources each task asks for. ``auto`` means CUDA when the
        cluster has GPUs; a task on a GPU sees only that one, so its device is ``cuda`` whatever index was asked."""
        device = self.request.device
        cuda = ray.cluster_resources().get("GPU", 0) > 0 if device == "auto" else device.startswith("cuda")
        resources = {"num_gpus": 1} if cuda else {"num_cpus": 1}
        resources.update(self.request.ray_resources)
        task_device = "cuda" if resources.get("num_gpus", 0) > 0 else "cpu"
        return task_device, resources
