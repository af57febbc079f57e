"""Experts: networks trained on the real training set, shared by MTT, TESLA, APM and the ``soft`` protocol.

MTT and TESLA need each expert's parameters after every epoch (a *trajectory*); APM and the soft protocol need
the final network (a *teacher*). Experts are trained once through the harness's one training loop and cached
by content — dataset, the fingerprint of its files (``RawSplits.fingerprint``) and transform (including the
ZCA fingerprint), architecture, recipe, seed, ``EXPERT_CODE_VERSION`` and how they were trained
(``training_provenance``: device, CPU threads, torch version, which change the last digits) — as safetensors
under ``<cache>/experts/<key>/``, each beside a ``.sha256.json`` with its SHA-256. A pool that was interrupted
resumes at the first expert whose file is missing; a file that does not match its checksum (or has none) is
trained again; a second run of the same recipe trains nothing.

Recipes (``notes/methods.md`` §4):

* ``mtt`` — Cazenavette et al. 2022 ``buffer.py``: 50 epochs, SGD lr 0.01, no momentum, no weight decay,
  batch 256, DSA; keeps the trajectory.
* ``apm`` — Chen et al. 2023 ``model_train``: 100 epochs, SGD lr 0.05, momentum 0.9, wd 5e-4, lr ×0.1 at epoch 50,
  DSA. The official code keeps each teacher's epoch with the best *test* accuracy; we keep the last epoch.

Quick recipes are the same recipes with fewer epochs (and pools with fewer experts, chosen by the methods).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from bench.augment import DSA
from bench.data import Dataset
from bench.distilled import file_sha256, save_safetensors_atomic, write_json_atomic
from bench.errors import UserError
from bench.evaluate import Protocol, train_network
from bench.models import create_network
from bench.progress import progress_bar
from bench.seeding import generator_for
from bench.store import check_writable_folder, stable_hash

CACHE_ENV = "DDBENCH_CACHE"
EXPERT_CODE_VERSION = 1  # bump when the training loop changes what an expert is


@dataclass(frozen=True)
class ExpertRecipe:
    name: str
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int = 256
    decay_epoch: int | None = None  # lr ×0.1 from this epoch on; None: constant lr
    dsa: bool = True
    keep_trajectory: bool = False

    def as_protocol(self) -> Protocol:
        return Protocol(
            f"expert-{self.name}", EXPERT_CODE_VERSION, "hard", "ce", self.epochs, self.epochs, self.lr,
            self.momentum, self.weight_decay, self.batch_size, self.dsa,
            decay_epoch=self.epochs if self.decay_epoch is None else self.decay_epoch,
        )

    def quick(self, epochs: int) -> "ExpertRecipe":
        """The same recipe over fewer epochs (the decay epoch scaled with it)."""
        decay = None if self.decay_epoch is None else max(1, round(self.decay_epoch * epochs / self.epochs))
        return replace(self, name=f"{self.name}-quick{epochs}", epochs=epochs, decay_epoch=decay)


EXPERT_RECIPES = {
    "mtt": ExpertRecipe("mtt", epochs=50, lr=0.01, momentum=0.0, weight_decay=0.0, keep_trajectory=True),
    "apm": ExpertRecipe("apm", epochs=100, lr=0.05, momentum=0.9, weight_decay=5e-4, decay_epoch=50),
}


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``--cache-dir`` if given, else ``$DDBENCH_CACHE``, else ``~/.cache/ddbench``."""
    try:
        if cache_dir:
            return Path(cache_dir).expanduser()
        env = os.environ.get(CACHE_ENV)
        return Path(env).expanduser() if env else Path.home() / ".cache" / "ddbench"
    except RuntimeError as exc:  # ~name of no user, or no home directory
        raise UserError(f"cache folder {cache_dir or os.environ.get(CACHE_ENV) or '~/.cache/ddbench'}: {exc}; pass "
                        f"--cache-dir (or set ${CACHE_ENV}) to a folder you can write to") from None


def check_cache_dir(cache_dir: str | os.PathLike | None = None) -> None:
    """Check the cache folder (``resolve_cache_dir``) before any work: experts, their locks and auto's engine
    choices are written there, so a folder that cannot be written — or whose ``experts`` is not a folder — is a
    ``UserError`` now, not a failed cell later."""
    root = resolve_cache_dir(cache_dir)
    fix = f"pass --cache-dir (or set ${CACHE_ENV}) to a folder you can write to"
    check_writable_folder(root, "cache folder", fix)
    experts = root / "experts"
    if os.path.lexists(experts) and not experts.is_dir():  # a file, or a link to nothing
        raise UserError(f"expert cache folder {experts} is a file, not a folder; move or delete it, or {fix}")


def training_provenance(device: torch.device | str) -> dict[str, str | int]:
    """What, beyond the setting, changes an expert's trained numbers (in their last digits): the device type and,
    on a GPU, its name; on the CPU, torch's thread count now (it splits floating-point sums differently); and
    torch's version. Part of the cache key, so that a run never loads experts trained another way."""
    device = torch.device(device)
    provenance: dict[str, str | int] = {"device": device.type, "torch": str(torch.__version__)}
    if device.type == "cuda":
        provenance["gpu"] = torch.cuda.get_device_name(device)
    elif device.type == "cpu":
        provenance["cpu_threads"] = torch.get_num_threads()
    return provenance


@contextmanager
def _exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An advisory lock on ``path`` (POSIX ``flock``; where there is none, no lock): held by one process at a time.
    ``on_wait`` is called once, before waiting, when another holds it."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        handle = open(path, "a")
    except OSError as exc:  # a folder where the lock file goes, a read-only pool folder
        raise UserError(f"cannot open the expert cache's lock file {path} ({exc.strerror or exc}); delete or fix "
                        f"it (it holds nothing), or pass another --cache-dir") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ExpertPool:
    """``count`` experts of one recipe on one dataset and architecture, trained on demand and cached."""

    def __init__(
        self,
        dataset: Dataset,
        arch: str,
        recipe: ExpertRecipe,
        count: int,
        device: torch.device | str,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
    ):
        self.dataset, self.arch, self.recipe, self.count = dataset, arch, recipe, count
        self.device, self.seed, self.log = torch.device(device), seed, log or (lambda message: None)
        setting = {
            "dataset": dataset.name,
            "transform": dataset.transform,
            "n_train": int(dataset.train_images.shape[0]),
            "arch": arch,
            "recipe": asdict(recipe),
            "seed": seed,
            "code_version": EXPERT_CODE_VERSION,
        }
        # The experts' random streams follow the setting alone, so that the same setting draws the same networks
        # whatever copy of the data it reads; the cache key also holds the data files' fingerprint, so that
        # another copy (a subset, random pixels) trains experts of its own rather than loading these.
        # How the experts are trained (device, CPU threads, torch) changes their last digits but not their random
        # streams: it is in the key, so that each way trains experts of its own, and not in the seed key, so that
        # an unchanged way keeps drawing — and training — the same networks.
        self.seed_key = stable_hash(setting, 16)
        self.identity = {**setting, "data": dataset.fingerprint, "trained_with": training_provenance(self.device)}
        self.key = stable_hash(self.identity, 16)
        self.folder = resolve_cache_dir(cache_dir) / "experts" / self.key
        self.trained_now = 0  # experts trained (not loaded) by this pool object
        self._parameter_shapes: dict[str, torch.Size] | None = None  # of the architecture, built on first use

    def path(self, index: int) -> Path:
        """Expert ``index``'s safetensors file."""
        return self.folder / f"expert_{index:04d}.safetensors"

    def checksum_path(self, index: int) -> Path:
        """The sidecar of expert ``index``'s file: its name and SHA-256, written after it."""
        return self.folder / f"expert_{index:04d}.sha256.json"

    def ensure(self) -> None:
        """Train every missing or untrusted expert, in order, with a progress bar over their epochs; those already
        cached are kept (so an interrupted training resumes at the expert it stopped in).

        A file that does not match the SHA-256 in its sidecar (corrupted, torn), or has no sidecar (a cache
        written before checksums, or a training killed between the two files), is trained again, with a log line.

        Training holds an exclusive lock on the pool's folder, so processes sharing a cache (cells side by side,
        Ray tasks on one node) train each expert once: the others wait (with a log line), then load it."""
        if self._experts_to_train():
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = self.folder / ".lock"
            with _exclusive_lock(lock, on_wait=lambda: self.log(
                    f"waiting for {lock}: another ddbench process is training these experts")):
                to_train = self._experts_to_train()  # again: the lock's last holder may have trained them
                for index, problem in to_train.items():
                    if problem is not None:
                        self.log(f"expert {index} in {self.folder} {problem}: training it again")
                if to_train:
                    write_json_atomic(self.folder / "identity.json", self.identity)
                    self.log(f"experts: training {len(to_train)} of {self.count} × {self.recipe.name} on "
                             f"{self.dataset.name}/{self.arch} into {self.folder}")
                    with progress_bar(f"experts {self.recipe.name}", len(to_train) * self.recipe.epochs) as bar:
                        for index in to_train:
                            bar.set_postfix_str(f"expert {index + 1} of {self.count}")
                            self._train(index, after_epoch=lambda: bar.update(1))
                            self.trained_now += 1
                    return
        self.log(f"experts: {self.count} × {self.recipe.name} on {self.dataset.name}/{self.arch} loaded from cache {self.folder}")

    def _experts_to_train(self) -> dict[int, str | None]:
        """The experts whose file cannot be used, in order: index → why (None: the file is missing)."""
        to_train = {}
        for index in range(self.count):
            if not self.path(index).is_file():
                to_train[index] = None
            elif (problem := self._checksum_problem(index)) is not None:
                to_train[index] = problem
        return to_train

    def _checksum_problem(self, index: int) -> str | None:
        """Why expert ``index``'s existing file cannot be trusted (for a log line), or None when it matches the
        SHA-256 in its sidecar."""
        sidecar = self.checksum_path(index)
        if not sidecar.is_file():
            return f"has no checksum ({sidecar.name}: a cache from before checksums, or an interrupted training)"
        try:
            expected = json.loads(sidecar.read_text())["sha256"]
            actual = file_sha256(self.path(index))
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            return f"has an unreadable checksum ({sidecar.name}: {exc})"
        return None if actual == expected else "does not match its checksum"

    def _train(self, index: int, after_epoch: Callable[[], None]) -> None:
        generator = generator_for(self.seed, "expert", self.seed_key, str(index))
        data = self.dataset
        model = create_network(self.arch, data.num_classes, data.channels, data.resolution, generator).to(self.device)
        snapshots: dict[str, Tensor] = {}

        def snapshot(epoch: int) -> None:
            for name, param in model.named_parameters():
                snapshots[f"epoch{epoch:04d}/{name}"] = param.detach().cpu().clone()

        def on_epoch(epoch: int, loss: Tensor) -> None:
            if self.recipe.keep_trajectory:
                snapshot(epoch + 1)
            after_epoch()

        if self.recipe.keep_trajectory:
            snapshot(0)
        augment = DSA.for_dataset(data.info.digit_like) if self.recipe.dsa else None
        train_network(model, data.train_images, data.train_labels, self.recipe.as_protocol(), generator, augment, on_epoch)
        final = {f"final/{name}": t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
        # How the file was made, for whoever opens the cache. One metadata entry: safetensors writes several in a
        # random order, and the same expert must give the same bytes.
        made = {"expert": index, "key": self.key, "seed_key": self.seed_key, "identity": self.identity}
        metadata = {"ddbench_expert": json.dumps(made, sort_keys=True, default=str)}
        save_safetensors_atomic({**snapshots, **final}, self.path(index), metadata=metadata)
        write_json_atomic(self.checksum_path(index), {"file": self.path(index).name,
                                                      "sha256": file_sha256(self.path(index))})

    def _load(self, index: int) -> dict[str, Tensor]:
        if not self.path(index).is_file():
            self.ensure()
        try:
            return load_file(str(self.path(index)), device=str(self.device))
        except (SafetensorError, OSError) as exc:  # a truncated or corrupt file
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"expert cache file {self.path(index)} is unreadable, truncated or corrupt ({text}); "
                            f"delete it and the expert is trained again") from None

    def _blank_network(self) -> nn.Module:
        """A network of the pool's architecture, whose parameters are about to be replaced by an expert's."""
        data = self.dataset
        return create_network(self.arch, data.num_classes, data.channels, data.resolution, torch.Generator().manual_seed(0))

    def _check_tensors(self, index: int, expected: dict[str, torch.Size], found: dict[str, Tensor]) -> None:
        """A one-line ``UserError`` naming expert ``index``'s file when ``found`` does not hold exactly the
        ``expected`` tensor names and shapes (a file written for another architecture or by other code)."""
        missing = [name for name in expected if name not in found]
        unexpected = [name for name in found if name not in expected]
        misshapen = [f"{name} is {list(found[name].shape)}, expected {list(shape)}"
                     for name, shape in expected.items() if name in found and found[name].shape != shape]
        not_numbers = [f"{name} is {found[name].dtype}, expected floating point" if not found[name].is_floating_point()
                       else f"{name} holds non-finite values"
                       for name in expected if name in found and found[name].dtype != torch.int64
                       and (not found[name].is_floating_point() or not bool(torch.isfinite(found[name]).all()))]
        problems = ([f"{len(missing)} missing, first {missing[0]}"] if missing else []) + (
            [f"{len(unexpected)} unexpected, first {unexpected[0]}"] if unexpected else []) + misshapen[:1] + (
            not_numbers[:1])
        if problems:
            raise UserError(f"expert cache file {self.path(index)} does not hold the tensors of a {self.arch} expert "
                            f"of recipe {self.recipe.name} ({'; '.join(problems)}); delete it and the expert is "
                            f"trained again")

    def network(self, index: int) -> nn.Module:
        """Expert ``index``'s final network (last epoch), in eval mode on the device."""
        tensors = self._load(index)
        model = self._blank_network()
        final = {key: value for key, value in tensors.items() if key.startswith("final/")}
        self._check_tensors(index, {f"final/{name}": t.shape for name, t in model.state_dict().items()}, final)
        model.load_state_dict({key.removeprefix("final/"): value for key, value in final.items()})
        return model.to(self.device).eval()

    def trajectory(self, index: int) -> list[dict[str, Tensor]]:
        """Expert ``index``'s parameters at epochs 0 (initialisation) … ``epochs``, as name → tensor dicts."""
        if not self.recipe.keep_trajectory:
            raise ValueError(f"expert recipe '{self.recipe.name}' keeps no trajectory")
        tensors = self._load(index)
        if self._parameter_shapes is None:
            self._parameter_shapes = {name: p.shape for name, p in self._blank_network().named_parameters()}
        self._check_tensors(index, {f"epoch{epoch:04d}/{name}": shape for epoch in range(self.recipe.epochs + 1)
                                    for name, shape in self._parameter_shapes.items()},
                            {k: v for k, v in tensors.items() if not k.startswith("final/")})
        epochs: list[dict[str, Tensor]] = [dict() for _ in range(self.recipe.epochs + 1)]
        for key, value in tensors.items():
            if key.startswith("epoch"):
                epoch, name = key.split("/", 1)
                epochs[int(epoch.removeprefix("epoch"))][name] = value
        return epochs


QUICK_EXPERT_EPOCHS = {"mtt": 10, "apm": 20}  # the CPU-sized expert recipes (`--quick`)


def expert_recipe(name: str, quick: bool, epochs: int | None = None) -> ExpertRecipe:
    """A named expert recipe; ``quick`` shortens it to ``QUICK_EXPERT_EPOCHS`` unless ``epochs`` is given."""
    recipe = EXPERT_RECIPES[name]
    epochs = epochs if epochs is not None else (QUICK_EXPERT_EPOCHS[name] if quick else None)
    return recipe if epochs is None or epochs == recipe.epochs else recipe.quick(epochs)


def soft_protocol_teacher(
    dataset: Dataset, arch: str, quick: bool, device: torch.device | str, cache_dir: str | os.PathLike | None,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """The teacher of the ``soft`` protocol: expert 0 of APM's teacher pool (the same for every method).

    Fixed by index, never chosen by test accuracy, so every method is evaluated against the same teacher.
    """
    pool = _soft_teacher_pool(dataset, arch, quick, device, cache_dir, log)
    pool.ensure()
    return pool.network(0)


def _soft_teacher_pool(dataset: Dataset, arch: str, quick: bool, device: torch.device | str,
                       cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> ExpertPool:
    """The one-expert pool of APM's recipe whose expert 0 teaches the ``soft`` protocol."""
    return ExpertPool(dataset, arch, expert_recipe("apm", quick), 1, device, cache_dir, log=log)


def soft_targets_source(soft_labels_stored: bool, dataset: Dataset, arch: str, quick: bool,
                        device: torch.device | str) -> dict:
    """What a ``soft`` protocol's targets were, for its records: the set's own stored soft labels, or the logits of
    ``soft_protocol_teacher`` (which expert of which cached pool)."""
    if soft_labels_stored:
        return {"source": "the set's stored soft labels"}
    pool = _soft_teacher_pool(dataset, arch, quick, device)  # its key only: nothing is read or trained
    return {"source": "teacher", "arch": arch, "recipe": pool.recipe.name, "epochs": pool.recipe.epochs, "expert": 0,
            "cache_key": pool.key}
