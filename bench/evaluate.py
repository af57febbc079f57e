"""The one train-on-distilled / test-on-real loop of the project, and the named protocols that configure it.

A protocol is a versioned recipe for turning a distilled set into an accuracy:

* ``standard`` (v1) — the community's protocol (DC, DSA, DM, MTT): a freshly initialised network trained on the
  distilled set with hard labels and cross-entropy; SGD lr 0.01 (or the method's *learned* lr, MTT-style),
  momentum 0.9, weight decay 5e-4, batch 256, 1000 epochs with DSA, lr ×0.1 once after epoch ``epochs//2 + 1``.
* ``soft`` (v1) — APM's own evaluation (Chen et al. 2023, official ``evaluate_synset_mc``): the network
  regresses fixed targets with L1 (KL with a temperature as an option): a teacher's logits on the *un-augmented*
  distilled images, computed once, or the set's stored soft labels; DSA is applied to the inputs only.

Each has a *quick* form for CPUs (fewer epochs), flagged ``quick`` in every record. The reported figure is the
test accuracy after the *last* epoch — never a checkpoint chosen on the test set — for every seed, with the
mean and the population standard deviation (``np.std``, as the papers report).

The seeds of one evaluation can train at once (``batch_seeds``): the S networks become one stacked model
(``bench.seed_stack``) that the same loop drives, each seed with its own initialisation, batch order, DSA
parameters and SGD state — its generator is consumed exactly as when it trains alone, so both paths compute
the same thing (up to floating-point rounding). ``auto`` takes whichever a short calibration finds faster on
this machine (on a CPU often the sequential path), remembered in ``<cache>/eval_engine.json``; records say which
path ran and why (``eval_engine``). On CUDA the batched steps may be replayed from CUDA graphs (``_CudaGraphSteps``),
which auto checks against eager steps before using them.

Deviations from the DC reference loop, on purpose: it trains ``Epoch + 1`` epochs and re-creates the optimiser
(dropping momentum) when decaying the lr; here exactly ``epochs`` epochs run and the decay keeps momentum. At
1000 epochs the reference runs 502 epochs at lr 0.01 and 499 at 0.001, this loop 501 and 499: the epoch it does
not run is one at the higher lr.

DC's own tables were evaluated otherwise: its ``main.py`` trains 300 epochs without augmentation when DSA is off
(on MNIST, 1000 epochs with DC's crop/scale/rotate augmentation). No protocol here reproduces that; reports mark
DC's published rows as evaluated that way (``results/published.json``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.augment import DSA
from bench.data import Dataset
from bench.distilled import DistilledSet, write_json_atomic
from bench.errors import UserError
from bench.measure import innermost_flop_counter
from bench.models import create_network
from bench.registry import Registry
from bench.seed_stack import (BATCHNORM_REASON, SeedStack, batching_unsupported_reason, forward_kind,
                              has_batchnorm_statistics)
from bench.seeding import generator_for, global_rng_seeded_from

EpochCallback = Callable[[int, Tensor], None]
"""``on_epoch(epoch, loss)``: ``loss`` is the epoch's mean training loss, a float64 scalar tensor on the training
device (``float(loss)`` reads it, and waits for the device to get there)."""


@dataclass(frozen=True)
class Protocol:
    name: str
    version: int
    targets: str  # "hard" (class labels) or "soft" (teacher logits)
    loss: str  # "ce", "l1" or "kl"
    epochs: int
    quick_epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    temperature: float = 1.0  # for loss "kl"
    accepts_learned_lr: bool = True  # a method's learned lr replaces `lr`
    decay_epoch: int | None = None  # lr ×0.1 from this epoch on; None: epochs // 2 + 1

    def resolve(self, quick: bool, learned_lr: float | None = None, **overrides: object) -> "Protocol":
        """The protocol as it will run: quick epochs, a handed-over learned lr, then explicit overrides."""
        resolved = replace(self, epochs=self.quick_epochs if quick else self.epochs)
        if learned_lr is not None and self.accepts_learned_lr:
            resolved = replace(resolved, lr=float(learned_lr))
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise UserError(f"unknown protocol option(s) {sorted(unknown)} for protocol '{self.name}'")
        resolved = replace(resolved, **overrides)  # type: ignore[arg-type]
        if resolved.decay_epoch is None:  # after the overrides: an epochs override moves the decay with it
            resolved = replace(resolved, decay_epoch=resolved.epochs // 2 + 1)
        return resolved

    def as_record(self) -> dict:
        return asdict(self)


def protocol_label(name: str, quick: bool, resolved: dict) -> str:
    """What an evaluation ran, for console lines: ``standard, quick: 300 epochs, lr 0.00632`` (``resolved``: the
    record's ``protocol_config``, whose lr may be a learned one and whose epochs a set's or ``--eval-epochs``')."""
    return f"{name}{', quick' if quick else ''}: {resolved['epochs']} epochs, lr {resolved['lr']:.3g}"


PROTOCOLS: Registry[Protocol] = Registry("protocol")
PROTOCOLS.register("standard", Protocol("standard", 1, targets="hard", loss="ce", epochs=1000, quick_epochs=300, lr=0.01))
PROTOCOLS.register("soft", Protocol("soft", 1, targets="soft", loss="l1", epochs=1000, quick_epochs=300, lr=0.01))


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)


def list_protocols() -> list[str]:
    return PROTOCOLS.names()


# --------------------------------------------------------------------------------------------------------------
# The loop


def _loss(protocol: Protocol, logits: Tensor, target: Tensor) -> Tensor:
    if protocol.loss == "ce":
        return F.cross_entropy(logits, target)
    if protocol.loss == "l1":
        return F.l1_loss(logits, target)
    if protocol.loss == "kl":
        t = protocol.temperature
        return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target / t, 1), log_target=True, reduction="batchmean") * t * t
    raise ValueError(f"unknown loss '{protocol.loss}'")


def _stacked_losses(protocol: Protocol, logits: Tensor, target: Tensor) -> Tensor:
    """``[S]``: ``_loss`` of each seed's ``logits[s]`` (``[S, batch, classes]``) against ``target[s]``, computed
    for all seeds at once (the same values, up to the order of the sums)."""
    seeds, batch = logits.shape[:2]
    if protocol.loss == "ce":
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), reduction="none").view(seeds, batch).mean(1)
    if protocol.loss == "l1":
        return (logits - target).abs().flatten(1).mean(1)
    if protocol.loss == "kl":
        t = protocol.temperature
        pointwise = F.kl_div(F.log_softmax(logits / t, 2), F.log_softmax(target / t, 2), log_target=True, reduction="none")
        return pointwise.flatten(1).sum(1) / batch * t * t
    raise ValueError(f"unknown loss '{protocol.loss}'")


def _optimizer(parameters: Iterable[Tensor], protocol: Protocol) -> torch.optim.SGD:
    return torch.optim.SGD(parameters, lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay)


class _Steps:
    """Training steps of one network or of a stack of them: ``tensors`` turns the networks' inputs and targets into
    the batch tensors, ``losses`` maps them to one loss per network, and ``train_step`` is input drawing, forward,
    loss, backward and SGD step (the losses summed before the backward pass, so each network gets its own
    gradient)."""

    optimizer: torch.optim.SGD
    device: torch.device  # where the networks compute

    def tensors(self, inputs: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def losses(self, inputs: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def train_step(self, images: Tensor, targets: Tensor, batches: list[Tensor], generators: list[torch.Generator],
                   augment: DSA | None) -> Tensor:
        """One step of every network on its ``batches[i]`` of (images, targets), augmented with its generator;
        returns the networks' losses (on the device)."""
        inputs = _draw_inputs(images, batches, generators, augment)
        values = self.losses(*self.tensors(inputs, [targets[batch] for batch in batches]))
        self.optimizer.zero_grad(set_to_none=True)
        values.sum().backward()
        self.optimizer.step()
        return values.detach()


class _OneNetworkSteps(_Steps):
    """Training steps of one network (the sequential path)."""

    def __init__(self, model: nn.Module, protocol: Protocol):
        self.model, self.protocol = model, protocol
        self.optimizer = _optimizer(model.parameters(), protocol)
        self.device = _device_of(model, torch.device("cpu"))

    def tensors(self, inputs: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        return inputs[0], targets[0]

    def losses(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return _loss(self.protocol, self.model(inputs), targets).reshape(1)


class _StackedSteps(_Steps):
    """Training steps of a ``SeedStack`` (the seed-batched path): one forward and backward for every seed, and
    ``torch.optim.SGD`` on the stacked parameters — element-wise, so each seed gets exactly the update it would
    get alone, momentum buffer (the first step sets it to the gradient), weight decay and lr decay included."""

    def __init__(self, stack: SeedStack, protocol: Protocol):
        self.stack, self.protocol = stack, protocol
        self.optimizer = _optimizer(stack.parameters, protocol)
        self.device = stack.parameters[0].device

    def tensors(self, inputs: list[Tensor], targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        return torch.stack(inputs), torch.stack(targets)

    def losses(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return _stacked_losses(self.protocol, self.stack.logits(inputs), targets)


@dataclass
class _CapturedStep:
    graph: "torch.cuda.CUDAGraph"
    batch_index: Tensor  # static buffers the graph reads, refilled every step: the seeds' batches, joined
    augmentation: Tensor | None  # the seeds' DSA draws, packed (``DSA.pack``)
    losses: Tensor  # the static buffer the graph writes


class _CudaGraphSteps:
    """``steps`` with each whole training step — batch gather, DSA, forward, backward, SGD step — replayed from a
    CUDA graph: one launch instead of the hundreds of small kernel launches that bound a step at a few images per
    class (on an H200, one eager batched ConvNet step of 5 seeds at CIFAR-10 ipc 1 took 5.7 ms in auto's calibration,
    far more than its arithmetic needs: ``results/gpu/2026-11-30-h200/batched_eval.log``).

    The host still draws everything from each seed's generator, exactly as an eager step does (the epoch's batch
    order, then each step's DSA operation and parameters), and copies the draws into the graph's static buffers:
    the batch indices, and the DSA draws packed into one tensor. A graph cannot branch on the drawn operation, so
    it applies DSA through ``DSA.apply_packed``: every operation on every image, each image keeping its own
    operation's output — the same values as the eager ``augment_each``. A graph is captured per (batch size,
    learning rate): an epoch's last batch may be smaller, and the lr decay changes a constant that SGD's kernels
    hold. As ``torch.cuda.graph``'s documentation asks, each graph is captured after ``WARMUP_STEPS`` eager steps
    on a side stream, and on that stream; those are real training steps (the first one creates SGD's momentum
    buffers, which the graphs then update in place). Inside a FLOP-counting window the steps run eagerly, since
    a replay dispatches no operation to count.
    """

    WARMUP_STEPS = 3

    def __init__(self, steps: _Steps):
        self.steps, self.optimizer, self.device = steps, steps.optimizer, steps.device
        self.captured: dict[tuple, _CapturedStep] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.side_stream = torch.cuda.Stream()

    def train_step(self, images: Tensor, targets: Tensor, batches: list[Tensor], generators: list[torch.Generator],
                   augment: DSA | None) -> Tensor:
        """``steps.train_step``, replayed from this batch size's and learning rate's graph once it is captured."""
        if innermost_flop_counter() is not None:
            return self.steps.train_step(images, targets, batches, generators, augment)
        size = len(batches[0])
        key = (size, tuple(group["lr"] for group in self.optimizer.param_groups))
        captured = self.captured.get(key)
        if captured is None and self.eager_steps.get(key, 0) < self.WARMUP_STEPS:
            self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
            return self._eager_step(images, targets, batches, generators, augment)
        packed = None
        if augment is not None:  # the draws of _draw_inputs, in its order
            image_size = (images.shape[2], images.shape[3])
            packed = augment.pack([augment.sample(size, image_size, g) for g in generators], [size] * len(batches))
        if captured is None:
            captured = self.captured[key] = self._capture(images, targets, len(batches), size, augment, packed)
        torch.cat(batches, out=captured.batch_index)
        if packed is not None:
            captured.augmentation.copy_(packed.pin_memory(), non_blocking=True)  # pinned: no wait for the device
        captured.graph.replay()
        return captured.losses.clone()

    def _eager_step(self, images: Tensor, targets: Tensor, batches: list[Tensor], generators: list[torch.Generator],
                    augment: DSA | None) -> Tensor:
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            values = self.steps.train_step(images, targets, batches, generators, augment)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        values.record_stream(torch.cuda.current_stream())  # read on this stream, made on the side one
        return values

    def _capture(self, images: Tensor, targets: Tensor, networks: int, size: int, augment: DSA | None,
                 packed: Tensor | None) -> _CapturedStep:
        batch_index = torch.zeros(networks * size, dtype=torch.long, device=images.device)
        augmentation = None if packed is None else packed.to(images.device)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates its own gradients
        # Captured on the warm-up's stream, whose library handles (cuBLAS, cuDNN) the warm-up created. The default
        # capture mode ("global") is the one documented for a backward pass inside the capture (autograd runs it on
        # its own thread); no other thread of a cell's process uses the GPU (cells are processes, one per GPU).
        with torch.cuda.graph(graph, stream=self.side_stream):
            inputs = images[batch_index]
            if augment is not None:
                inputs = augment.apply_packed(inputs, augmentation)
            batch_targets = targets[batch_index]
            values = self.steps.losses(*self.steps.tensors(list(inputs.split(size)), list(batch_targets.split(size))))
            values.sum().backward()
            self.optimizer.step()
        return _CapturedStep(graph, batch_index, augmentation, values.detach())


def _draw_inputs(images: Tensor, batches: list[Tensor], generators: list[torch.Generator],
                 augment: DSA | None) -> list[Tensor]:
    """Each network's inputs for one step: its batch of images, augmented with its own generator."""
    inputs = [images[batch] for batch in batches]
    if augment is None:
        return inputs
    if len(inputs) == 1:
        return [augment(inputs[0], generators[0])]
    return augment.augment_each(inputs, generators)


def held_elsewhere(images: Tensor, device: torch.device) -> bool:
    """Whether a training set lives on another device than the networks that train on it (a dataset too large for
    the GPU, held in host memory): the loop then moves each step's batches to the networks (``_staged_step``)."""
    return images.device != device


def _staged_step(images: Tensor, targets: Tensor, batches: list[Tensor],
                 device: torch.device) -> tuple[Tensor, Tensor, list[Tensor]]:
    """One step's images and targets gathered where they live and moved to ``device``, with the batches re-indexed
    into them: the step then sees exactly the inputs it would see were the whole set on the device."""
    joined = torch.cat(batches)
    local = torch.arange(len(joined), device=device).split([len(batch) for batch in batches])
    return images[joined].to(device), targets[joined.to(targets.device)].to(device), list(local)


def _train(
    steps: _Steps | _CudaGraphSteps,
    images: Tensor,
    targets: Tensor,
    protocol: Protocol,
    generators: list[torch.Generator],
    augment: DSA | None,
    on_epoch: EpochCallback | None,
) -> list[float]:
    """THE loop, for one network or a stack of them (one generator each); returns each one's last-epoch mean loss.

    Every generator is consumed exactly as for one network alone: per epoch, one permutation of the set; per
    step, the augmentation's draws for the network's batch. ``on_epoch(epoch, loss)`` runs after each epoch for
    each network, in order.
    """
    decay_epoch = protocol.epochs // 2 + 1 if protocol.decay_epoch is None else protocol.decay_epoch
    n, count, device = images.shape[0], len(generators), steps.device
    staged = held_elsewhere(images, device)
    if staged and isinstance(steps, _CudaGraphSteps):
        raise ValueError("CUDA graphs read the training set where it lives: it must be on the networks' device")

    def one_epoch() -> Tensor:
        orders = [torch.randperm(n, generator=generator).to(images.device, non_blocking=True) for generator in generators]
        totals, seen = torch.zeros(count, dtype=torch.float64, device=device), 0
        for start in range(0, n, protocol.batch_size):
            batches = [order[start : start + protocol.batch_size] for order in orders]
            if staged:
                step_losses = steps.train_step(*_staged_step(images, targets, batches, device), generators, augment)
            else:
                step_losses = steps.train_step(images, targets, batches, generators, augment)
            totals += step_losses.to(torch.float64) * len(batches[0])
            seen += len(batches[0])
        return totals / seen

    # The losses stay on the device (float64: the sums of Python floats) and are read once, at the end: reading
    # one per step or per epoch would make the host wait for the device each time, and at a few images per
    # class an epoch is one step.
    # Inside a FLOP-counting window (APM's student training is inside the distillation's): count the first
    # epoch's steps, then run the others uncounted and add the same count — same operations, same shapes.
    counter = innermost_flop_counter()
    epoch_flops = 0
    epoch_losses = torch.full((count,), float("nan"), dtype=torch.float64)
    with global_rng_seeded_from(generators[0], device):  # a stack draws nothing in its forward
        for epoch in range(protocol.epochs):
            if epoch == decay_epoch:
                for group in steps.optimizer.param_groups:
                    group["lr"] = protocol.lr * 0.1
            if counter is None:
                epoch_losses = one_epoch()
            elif epoch == 0:
                before = counter.total
                epoch_losses = one_epoch()
                epoch_flops = counter.total - before
            else:
                with counter.paused():
                    epoch_losses = one_epoch()
                counter.add(epoch_flops)
            if on_epoch is not None:
                for value in epoch_losses:
                    on_epoch(epoch, value)
    return epoch_losses.tolist()


def train_network(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    protocol: Protocol,
    generator: torch.Generator,
    augment: DSA | None = None,
    on_epoch: EpochCallback | None = None,
) -> float:
    """Train ``model`` in place on (images, targets) as ``protocol`` says; returns the last epoch's mean loss.

    ``targets`` are class indices (loss ``ce``) or logits (``l1``/``kl``); ``augment`` transforms the inputs of
    every batch with fresh per-image parameters. ``on_epoch(epoch, loss)`` runs after each epoch.
    """
    model.train()
    return _train(_OneNetworkSteps(model, protocol), images, targets, protocol, [generator], augment, on_epoch)[0]


def train_networks_batched(
    models: list[nn.Module],
    images: Tensor,
    targets: Tensor,
    protocol: Protocol,
    generators: list[torch.Generator],
    augment: DSA | None = None,
    on_epoch: EpochCallback | None = None,
    grouped: bool = True,
) -> list[float]:
    """Train ``models`` (one architecture, one network per generator) in place, all at once as one stacked model;
    returns each one's last-epoch mean loss.

    Each network gets what ``train_network`` would give it alone with its generator — the same batches, the same
    augmentation, its own SGD state — up to floating-point rounding. ``on_epoch(epoch, loss)`` runs after each
    epoch once per network. ``grouped=False``: ``vmap`` even where grouped convolutions could compute the stack.
    """
    stack = SeedStack(models, grouped).train()
    losses = _train(_StackedSteps(stack, protocol), images, targets, protocol, generators, augment, on_epoch)
    stack.write_back()
    return losses


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    """Where ``model`` computes: its first parameter's (or buffer's) device; ``default`` for a model without either."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return default


@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """The model's logits on ``images`` in eval mode, batch by batch, without augmentation, on the model's device
    (``images`` may be held elsewhere: each batch is moved there)."""
    model.eval()
    device = _device_of(model, images.device)
    return torch.cat([model(chunk.to(device)) for chunk in images.split(batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent on (images, labels), in eval mode; batches move to the model's device."""
    model.eval()
    device = _device_of(model, images.device)
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size].to(device))
        correct += int((logits.argmax(1) == labels[start : start + batch_size].to(device)).sum())
    return 100.0 * correct / images.shape[0]


@torch.no_grad()
def stacked_accuracies(stack: SeedStack, images: Tensor, labels: Tensor, batch_size: int = 512) -> list[float]:
    """Top-1 accuracy in percent of every network of ``stack`` on (images, labels), in eval mode. Chunks hold
    ``batch_size // S`` images, so the stacked activations take about as much memory as ``accuracy``'s; they move
    to the stack's device."""
    stack.eval()
    device = stack.parameters[0].device
    chunk = max(1, batch_size // stack.size)
    correct = torch.zeros(stack.size, dtype=torch.long, device=device)
    for start in range(0, images.shape[0], chunk):
        logits = stack.logits(images[start : start + chunk].to(device), shared=True)
        correct += (logits.argmax(2) == labels[start : start + chunk].to(device)).sum(1)
    return [100.0 * hits / images.shape[0] for hits in correct.tolist()]


@dataclass
class EvaluationResult:
    eval_arch: str
    protocol: Protocol
    seeds: list[int]
    acc: list[float]
    final_train_loss: list[float]
    eval_engine: dict = field(default_factory=dict)  # {"path": "batched" | "sequential", "reason": ...}

    @property
    def acc_mean(self) -> float:
        return float(np.mean(self.acc))

    @property
    def acc_std(self) -> float:
        return float(np.std(self.acc))


def check_compatible(distilled: DistilledSet, dataset: Dataset) -> None:
    """A set is evaluated in the space it was made in: same dataset, same transform (ZCA or mean/std)."""
    meta = distilled.metadata
    if meta.get("dataset") not in (None, dataset.name):
        raise UserError(f"distilled set is from '{meta.get('dataset')}', not '{dataset.name}'")
    # A set read from a file always states its transform (DistilledSet.load refuses one that names its dataset
    # without it); one made in this process may not, and is evaluated on the dataset it was made from.
    stated = meta.get("transform") or {}
    kind = stated.get("kind")
    if kind is not None and kind != dataset.transform["kind"]:
        raise UserError(
            f"distilled set is in '{kind}' space but the test set was loaded with '{dataset.transform['kind']}'"
        )
    # The parameters of the space, where the set states them: ZCA's eps, mean/std's per-channel values (the dataset
    # rounds them to 6 decimals, so a relative 1e-3 allows for a set that writes 4 digits). Not ZCA's fingerprint:
    # a hash of the float32 matrix, whose last bits change with the thread count of the fit (digits: '11e56851…'
    # with 1 torch thread, 'c9047e9c…' with 2), so it would refuse sets made by `run --jobs 2` and
    # evaluated with 2 threads; the data files' fingerprint (checked by the caller) is what says the fit differs.
    for key in ("eps", "mean", "std"):
        if kind == dataset.transform["kind"] and key in stated and key in dataset.transform:
            ours, theirs = np.asarray(stated[key], dtype=float), np.asarray(dataset.transform[key], dtype=float)
            if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-3, atol=1e-6):
                raise UserError(f"distilled set's {kind} transform has {key} {stated[key]}, but {dataset.name} was "
                                f"loaded with {key} {dataset.transform[key]}: the set's pixels are in another space")
    if tuple(distilled.images.shape[1:]) != dataset.image_shape:
        raise UserError(f"distilled images are {tuple(distilled.images.shape[1:])}, the dataset's {dataset.image_shape}")
    if len(distilled) and int(distilled.labels.max()) >= dataset.num_classes:
        raise UserError(f"distilled set has label {int(distilled.labels.max())}, but {dataset.name} has classes "
                        f"0..{dataset.num_classes - 1}")
    ipc = meta.get("ipc")
    if ipc is not None and len(distilled):
        per_class = torch.bincount(distilled.labels.cpu(), minlength=dataset.num_classes)
        if bool((per_class != ipc).any()):
            counts = sorted(set(per_class.tolist()))
            raise UserError(f"distilled set says ipc {ipc} but holds {'/'.join(map(str, counts))} images per class: its "
                            f"records would be filed under ipc {ipc}; correct 'ipc' in its metadata (or set it to null)")
    soft = distilled.soft_labels
    if soft is not None and tuple(soft.shape) != (len(distilled), dataset.num_classes):
        raise UserError(f"distilled soft labels are {tuple(soft.shape)}, expected ({len(distilled)}, "
                        f"{dataset.num_classes}): one logit per class of {dataset.name} for each image")


# --------------------------------------------------------------------------------------------------------------
# Which path trains the seeds of an evaluation: all at once (seed-batched) or one after the other (sequential)

BATCH_SEEDS_CHOICES = ("auto", "on", "off")
ENGINE_CACHE_FILE = "eval_engine.json"  # in the cache folder: auto's calibrated choices on this machine
ENGINE_CACHE_VERSION = 2  # 2: CUDA entries also say whether graphs are replayed
CALIBRATION_ROUNDS = 3  # timed steps of each path, after one warm-up step of each
MIN_STEPS_TO_CALIBRATE = 100  # fewer training steps: sequential, uncalibrated (calibrating costs up to ~4 steps)
BATCHED_BELOW = 0.9  # auto batches when a batched step takes less than this fraction of the S sequential ones
GIVE_UP_RATIO = 1.2  # calibration stops after one timed batched step when it took over this × the sequential time
CALIBRATION_SEED = 1_000_003  # the calibration's own generators: the seeds' generators are never touched
GRAPH_AGREEMENT = 1e-4  # graphed and eager batched steps from one start must agree to this (relative): see below
_LOGGED: set[str] = set()


def _log_once(log: Callable[[str], None], message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log(message)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def calibration_key(device: torch.device, eval_arch: str, image_shape: tuple[int, ...], set_size: int, seeds: int,
                    batch_size: int) -> str:
    """What auto's choice is measured for: the device (CPU threads or GPU model) and torch version, the
    architecture, the image shape, the set size, the number of seeds and the batch size."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    shape = "x".join(str(side) for side in image_shape)
    return (f"{device.type} ({where}), torch {torch.__version__} | {eval_arch} | {shape} | n={set_size} | "
            f"seeds={seeds} | batch={batch_size}")


def engine_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/eval_engine.json``: auto's calibrated choices, so that a repeated run on a machine takes the same path."""
    from bench.experts import resolve_cache_dir  # bench.experts imports this module

    return resolve_cache_dir(cache_dir) / ENGINE_CACHE_FILE


def read_engine_cache(cache_dir: str | os.PathLike | None = None) -> dict[str, dict]:
    """The calibrated choices (key → entry); empty when the file is missing, unreadable or of another version."""
    try:
        payload = json.loads(engine_cache_path(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get("version") != ENGINE_CACHE_VERSION:
        return {}
    choices = payload.get("choices")
    return choices if isinstance(choices, dict) else {}


def _remember_choice(cache_dir: str | os.PathLike | None, key: str, entry: dict, log: Callable[[str], None]) -> None:
    choices = read_engine_cache(cache_dir)
    choices[key] = entry
    try:
        write_json_atomic(engine_cache_path(cache_dir), {"version": ENGINE_CACHE_VERSION, "choices": choices})
    except OSError as exc:
        _log_once(log, f"cannot write the evaluation-engine cache {engine_cache_path(cache_dir)} ({exc}); "
                       f"auto will calibrate again next time")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _apply_every_operation(augment: DSA, images: Tensor) -> None:
    """Run each operation of the augmentation's strategy once on ``images`` (no gradient, the calibration's own
    generator). A sequential step draws one operation, so one warm-up step meets one of them, and the first use of
    each other one — on CUDA, loading its kernels — would fall in whichever timed step first drew it; a stacked CUDA
    step runs every operation every step (``DSA.apply_dense``), so its own warm-up step meets them all."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    with torch.no_grad():
        for operation in augment.strategy:
            DSA((operation,), augment.config)(images, generator)


def calibrate_seed_batching(models: list[nn.Module], images: Tensor, targets: Tensor, protocol: Protocol,
                            augment: DSA | None) -> tuple[float, float]:
    """(sequential, batched) seconds for one training step of all S networks.

    Runs on copies of the networks with generators of its own, so the evaluation is unchanged. Every augmentation
    operation runs once first (``_apply_every_operation``); then each path runs one warm-up step and
    ``CALIBRATION_ROUNDS`` timed steps in a row — as in training, where a network's steps
    follow each other — and its figure is their mean; the sequential figure is S × one network's mean step,
    augmentation included. (The fastest single step, used before, flattered the short sequential steps and kept
    auto sequential where batching was 1.2–1.4× faster; ``benchmarks/calibration_fidelity.py`` sets the
    calibration beside whole trainings.) When the first timed batched step already takes over ``GIVE_UP_RATIO`` ×
    the sequential time, the calibration stops there: a clear loss costs two batched steps, and a gain repays its
    calibration within a few steps.
    """
    count, n = len(models), images.shape[0]
    batch_size = min(protocol.batch_size, n)
    generators = [torch.Generator().manual_seed(CALIBRATION_SEED + s) for s in range(count)]
    single = _OneNetworkSteps(copy.deepcopy(models[0]).train(), protocol)
    stacked = _StackedSteps(SeedStack(models).train(), protocol)

    def seconds(steps: _Steps, networks: int) -> float:
        batches = [torch.randperm(n, generator=g)[:batch_size].to(images.device) for g in generators[:networks]]
        _synchronize(images.device)
        start = time.perf_counter()
        steps.train_step(images, targets, batches, generators[:networks], augment)
        _synchronize(images.device)
        return time.perf_counter() - start

    if augment is not None:
        _apply_every_operation(augment, images[:batch_size])
    seconds(single, 1)  # warm-up: allocations, kernel selection
    sequential_s = count * statistics.fmean(seconds(single, 1) for _ in range(CALIBRATION_ROUNDS))
    seconds(stacked, count)
    batched_s = [seconds(stacked, count)]
    while len(batched_s) < CALIBRATION_ROUNDS and batched_s[0] <= GIVE_UP_RATIO * sequential_s:
        batched_s.append(seconds(stacked, count))
    return sequential_s, statistics.fmean(batched_s)


def calibrate_cuda_graphs(models: list[nn.Module], images: Tensor, targets: Tensor, protocol: Protocol,
                          augment: DSA | None) -> tuple[float | None, str | None]:
    """(seconds of one batched step replayed from a CUDA graph, None) — or (None, why not) where capture fails or
    the replayed steps do not compute what eager steps do.

    Two stacks of the same networks train side by side on the same batches and DSA draws (two copies of the same
    generators), one eagerly (``_StackedSteps``), one through ``_CudaGraphSteps`` (its warm-up, its capture and
    ``CALIBRATION_ROUNDS`` timed replays); their parameters must then agree to ``GRAPH_AGREEMENT`` (relative to the
    largest parameter: cuDNN's kernels are not bitwise reproducible, a stale static buffer or a lost update is
    far larger). The evaluation's networks and generators are untouched.
    """
    count, n = len(models), images.shape[0]
    batch_size = min(protocol.batch_size, n)

    def calibration_generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(CALIBRATION_SEED + s) for s in range(count)]

    try:
        eager = _StackedSteps(SeedStack(models).train(), protocol)
        graphed = _CudaGraphSteps(_StackedSteps(SeedStack(models).train(), protocol))
        eager_generators, graphed_generators = calibration_generators(), calibration_generators()
        timed: list[float] = []
        for step in range(_CudaGraphSteps.WARMUP_STEPS + CALIBRATION_ROUNDS):
            batches = [torch.randperm(n, generator=g)[:batch_size].to(images.device) for g in eager_generators]
            eager.train_step(images, targets, batches, eager_generators, augment)
            batches = [torch.randperm(n, generator=g)[:batch_size].to(images.device) for g in graphed_generators]
            _synchronize(images.device)
            start = time.perf_counter()
            graphed.train_step(images, targets, batches, graphed_generators, augment)
            _synchronize(images.device)
            if step >= _CudaGraphSteps.WARMUP_STEPS:  # the capture's step and the replays after it
                timed.append(time.perf_counter() - start)
    except Exception as exc:  # any failure to capture or replay (out of memory included): the steps run eagerly
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"CUDA graph capture failed ({type(exc).__name__}: {first_line[:200]})"
    scale = max(float(p.abs().max()) for p in eager.stack.parameters)
    difference = max(float((a - b).abs().max()) for a, b in zip(eager.stack.parameters, graphed.steps.stack.parameters))
    if not difference <= GRAPH_AGREEMENT * scale:
        return None, (f"CUDA graph replay disagreed with eager steps (largest parameter difference "
                      f"{difference:.3g}, {difference / scale:.3g} of the largest parameter)")
    return statistics.fmean(timed[1:]), None  # the first timed step also captured the graph


def choose_eval_engine(
    batch_seeds: str,
    eval_arch: str,
    models: list[nn.Module],
    images: Tensor,
    targets: Tensor,
    protocol: Protocol,
    augment: DSA | None = None,
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The record's ``eval_engine``: ``{"path": "batched" | "sequential", "reason": ...}`` (with
    ``batched_forward`` when batched; on CUDA, the TF32 settings and, when batched, ``cuda_graphs``).

    ``off``: sequential. ``on``: batched unless the networks cannot be stacked (BatchNorm running statistics, a
    forward vmap refuses), which falls back to sequential with the reason logged once. ``auto``: sequential for
    one seed or unstackable networks; else the choice cached for this ``calibration_key`` in
    ``<cache>/eval_engine.json``, so that later runs on this machine take the same path without calibrating;
    else sequential for a training of under ``MIN_STEPS_TO_CALIBRATE`` steps (calibrating could cost more than
    batching saves); else the path ``calibrate_seed_batching`` finds faster — batched when it takes under
    ``BATCHED_BELOW`` × the sequential time — which is then cached. On CUDA, auto also measures the batched step
    replayed from CUDA graphs (``calibrate_cuda_graphs``, which checks it against eager steps) and replays graphs
    when they are faster; ``on`` runs the batched steps eagerly.
    """
    if batch_seeds not in BATCH_SEEDS_CHOICES:
        raise UserError(f"batch_seeds must be one of {', '.join(BATCH_SEEDS_CHOICES)}, got {batch_seeds!r}")
    log = log or _stderr
    device = _device_of(models[0], images.device)
    engine = _choose_path(batch_seeds, eval_arch, models, images, targets, protocol, augment, cache_dir, log)
    if engine["path"] == "batched":
        engine["batched_forward"] = forward_kind(models[0])
    if device.type == "cuda":
        engine["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
        if engine["path"] == "batched":
            engine.setdefault("cuda_graphs", False)
    return engine


def _choose_path(batch_seeds: str, eval_arch: str, models: list[nn.Module], images: Tensor, targets: Tensor,
                 protocol: Protocol, augment: DSA | None, cache_dir: str | os.PathLike | None,
                 log: Callable[[str], None]) -> dict:
    if batch_seeds == "off":
        return {"path": "sequential", "reason": "off"}
    if batch_seeds == "auto" and len(models) == 1:
        return {"path": "sequential", "reason": "auto: one seed, nothing to batch"}
    if has_batchnorm_statistics(models[0]):
        _log_once(log, f"evaluation of {eval_arch}: seeds trained one at a time: {BATCHNORM_REASON}")
        return {"path": "sequential", "reason": BATCHNORM_REASON}
    if held_elsewhere(images, _device_of(models[0], images.device)):
        return {"path": "sequential", "reason": f"a set held on the {images.device.type}, read batch by batch"}
    n = images.shape[0]
    key = calibration_key(images.device, eval_arch, tuple(images.shape[1:]), n, len(models), protocol.batch_size)
    if batch_seeds == "auto":
        cached = read_engine_cache(cache_dir).get(key)
        if isinstance(cached, dict) and cached.get("path") in ("batched", "sequential"):  # it ran when calibrated
            return {"path": cached["path"], **({"cuda_graphs": True} if cached.get("cuda_graphs") else {}),
                    "reason": f"auto: cached calibration, batched {cached.get('ratio')}× sequential time"}
        steps = protocol.epochs * math.ceil(n / protocol.batch_size)
        if steps < MIN_STEPS_TO_CALIBRATE:
            return {"path": "sequential", "reason": f"auto: {steps} training steps, too few to calibrate"}
    unsupported = batching_unsupported_reason(models, images[:2], partial(_stacked_losses, protocol), targets[:2])
    if unsupported is not None:
        _log_once(log, f"evaluation of {eval_arch}: seeds trained one at a time: {unsupported}")
        return {"path": "sequential", "reason": unsupported}
    if batch_seeds == "on":
        return {"path": "batched", "reason": "on"}
    try:
        sequential_s, batched_s = calibrate_seed_batching(models, images, targets, protocol, augment)
    except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
        reason = f"auto: the batched path ran out of memory while calibrating ({type(exc).__name__})"
        _log_once(log, f"evaluation of {eval_arch}: seeds trained one at a time: {reason}")
        return {"path": "sequential", "reason": reason}
    graphed_s, no_graphs = None, "not a CUDA device"
    if images.device.type == "cuda":
        graphed_s, no_graphs = calibrate_cuda_graphs(models, images, targets, protocol, augment)
        if no_graphs is not None:
            _log_once(log, f"evaluation of {eval_arch}: no CUDA graphs: {no_graphs}")
    use_graphs = graphed_s is not None and graphed_s < batched_s
    best_s = graphed_s if use_graphs else batched_s
    ratio = round(best_s / sequential_s, 2)
    path = "batched" if best_s < BATCHED_BELOW * sequential_s else "sequential"
    use_graphs = use_graphs and path == "batched"
    _remember_choice(cache_dir, key, {"path": path, "ratio": ratio, "sequential_step_s": round(sequential_s, 6),
                                      "batched_step_s": round(batched_s, 6),
                                      "graphed_step_s": None if graphed_s is None else round(graphed_s, 6),
                                      "cuda_graphs": use_graphs, "no_graphs_reason": no_graphs,
                                      "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}, log)
    graphs = " (replayed from CUDA graphs)" if use_graphs else ""
    return {"path": path, **({"cuda_graphs": True} if use_graphs else {}),
            "reason": f"auto: calibrated batched{graphs} {ratio}× sequential time"}


def evaluate_distilled(
    distilled: DistilledSet,
    dataset: Dataset,
    eval_arch: str,
    protocol: Protocol,
    seeds: list[int],
    device: torch.device | str,
    teacher: nn.Module | None = None,
    on_epoch: EpochCallback | None = None,
    batch_seeds: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] | None = None,
) -> EvaluationResult:
    """Train one fresh ``eval_arch`` network per seed on ``distilled`` and test each on the real test set.

    ``protocol`` is already resolved (quick form, learned lr). For each seed, one generator derived from the
    seed drives the network's initialisation, the batch order and the augmentation. ``batch_seeds`` (``auto``,
    ``on``, ``off``; see ``choose_eval_engine``) says whether the seeds' networks train at once, stacked, or
    one after the other — the same computation up to floating-point rounding; the result's ``eval_engine`` says
    which ran and why.
    ``on_epoch(epoch, loss)`` runs after every epoch of every network.
    """
    check_compatible(distilled, dataset)
    device = torch.device(device)
    # a set as large as a dataset held on the host (the `full` method's) is trained on from there, batch by batch
    on_host = dataset.held_apart and distilled.images.numel() >= dataset.train_images.numel()
    images = distilled.images.to("cpu" if on_host else device)
    if protocol.targets == "hard":
        targets = distilled.labels.to(device)
    elif teacher is not None:
        targets = logits_of(teacher.to(device), images)
    elif distilled.soft_labels is not None:
        targets = distilled.soft_labels.to(device)
    else:
        raise UserError(f"protocol '{protocol.name}' needs a teacher or a set with soft labels")
    augment = DSA.for_dataset(dataset.info.digit_like) if protocol.dsa else None
    generators = [generator_for(seed, "evaluate", eval_arch) for seed in seeds]
    models = [create_network(eval_arch, dataset.num_classes, dataset.channels, dataset.resolution, generator).to(device)
              for generator in generators]
    engine = choose_eval_engine(batch_seeds, eval_arch, models, images, targets, protocol, augment, cache_dir, log)
    test_images, test_labels = dataset.test_images, dataset.test_labels  # moved batch by batch if held elsewhere
    if engine["path"] == "batched":
        stack = SeedStack(models).train()
        steps: _Steps | _CudaGraphSteps = _StackedSteps(stack, protocol)
        if engine.get("cuda_graphs"):
            steps = _CudaGraphSteps(steps)
        losses = _train(steps, images, targets, protocol, generators, augment, on_epoch)
        accs = stacked_accuracies(stack, test_images, test_labels)
    else:
        losses, accs = [], []
        for model, generator in zip(models, generators):
            losses.append(train_network(model, images, targets, protocol, generator, augment, on_epoch))
            accs.append(accuracy(model, test_images, test_labels))
    return EvaluationResult(eval_arch, protocol, list(seeds), accs, losses, engine)
