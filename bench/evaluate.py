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

Deviations from the DC reference loop, on purpose: it trains ``Epoch + 1`` epochs and re-creates the optimiser
(dropping momentum) when decaying the lr; here exactly ``epochs`` epochs run and the decay keeps momentum.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.augment import DSA
from bench.data import Dataset
from bench.distilled import DistilledSet
from bench.errors import UserError
from bench.models import create_network
from bench.registry import Registry
from bench.seeding import generator_for

EpochCallback = Callable[[int, float], None]


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
        if resolved.decay_epoch is None:
            resolved = replace(resolved, decay_epoch=resolved.epochs // 2 + 1)
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise UserError(f"unknown protocol option(s) {sorted(unknown)} for protocol '{self.name}'")
        return replace(resolved, **overrides)  # type: ignore[arg-type]

    def as_record(self) -> dict:
        return asdict(self)


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
    optimizer = torch.optim.SGD(
        model.parameters(), lr=protocol.lr, momentum=protocol.momentum, weight_decay=protocol.weight_decay
    )
    decay_epoch = protocol.epochs // 2 + 1 if protocol.decay_epoch is None else protocol.decay_epoch
    n = images.shape[0]
    model.train()
    epoch_loss = float("nan")
    for epoch in range(protocol.epochs):
        if epoch == decay_epoch:
            for group in optimizer.param_groups:
                group["lr"] = protocol.lr * 0.1
        order = torch.randperm(n, generator=generator).to(images.device)
        total, seen = 0.0, 0
        for start in range(0, n, protocol.batch_size):
            batch = order[start : start + protocol.batch_size]
            x = images[batch]
            if augment is not None:
                x = augment(x, generator)
            loss = _loss(protocol, model(x), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        epoch_loss = total / seen
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    return epoch_loss


@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, batch_size: int = 512) -> Tensor:
    """The model's logits on ``images`` in eval mode, batch by batch, without augmentation."""
    model.eval()
    return torch.cat([model(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent on (images, labels), in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return 100.0 * correct / images.shape[0]


@dataclass
class EvaluationResult:
    eval_arch: str
    protocol: Protocol
    seeds: list[int]
    acc: list[float]
    final_train_loss: list[float]

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
    kind = (meta.get("transform") or {}).get("kind")
    if kind is not None and kind != dataset.transform["kind"]:
        raise UserError(
            f"distilled set is in '{kind}' space but the test set was loaded with '{dataset.transform['kind']}'"
        )
    if tuple(distilled.images.shape[1:]) != dataset.image_shape:
        raise UserError(f"distilled images are {tuple(distilled.images.shape[1:])}, the dataset's {dataset.image_shape}")


def evaluate_distilled(
    distilled: DistilledSet,
    dataset: Dataset,
    eval_arch: str,
    protocol: Protocol,
    seeds: list[int],
    device: torch.device | str,
    teacher: nn.Module | None = None,
    on_epoch: EpochCallback | None = None,
) -> EvaluationResult:
    """Train one fresh ``eval_arch`` network per seed on ``distilled`` and test each on the real test set.

    ``protocol`` is already resolved (quick form, learned lr). For each seed, one generator derived from the
    seed drives the network's initialisation, the batch order and the augmentation.
    """
    check_compatible(distilled, dataset)
    images = distilled.images.to(device)
    if protocol.targets == "hard":
        targets = distilled.labels.to(device)
    elif teacher is not None:
        targets = logits_of(teacher.to(device), images)
    elif distilled.soft_labels is not None:
        targets = distilled.soft_labels.to(device)
    else:
        raise UserError(f"protocol '{protocol.name}' needs a teacher or a set with soft labels")
    augment = DSA.for_dataset(dataset.info.digit_like) if protocol.dsa else None
    accs, losses = [], []
    for seed in seeds:
        generator = generator_for(seed, "evaluate", eval_arch)
        model = create_network(
            eval_arch, dataset.num_classes, dataset.channels, dataset.resolution, generator
        ).to(device)
        losses.append(train_network(model, images, targets, protocol, generator, augment, on_epoch))
        accs.append(accuracy(model, dataset.test_images.to(device), dataset.test_labels.to(device)))
    return EvaluationResult(eval_arch, protocol, list(seeds), accs, losses)
