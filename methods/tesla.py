"""TESLA — TrajEctory matching with Soft Label Assignment (Cui, Wang, Si & Hsieh, "Scaling Up Dataset
Distillation to ImageNet-1K with Constant Memory", ICML 2023; official code ``justincui03/tesla``).

TESLA is MTT (``methods/mtt.py``: same expert trajectories, same loss, same learnable step size α) with two
changes:

1. **Constant memory.** MTT back-propagates through a graph of all N student steps, so its memory grows with N.
   TESLA runs the N steps forward without a graph, keeping only per-step inputs, and then computes the gradient
   for each step's synthetic batch in a second pass, one step at a time. Here that second pass is an exact
   reverse-mode sweep (``methods.mtt.constant_memory_gradient``): from v = dL/dθ_N, each step i is recomputed
   from its stored θ_i and contributes −α (∂g_i/∂X_i)ᵀ v to its images and −⟨v, g_i⟩ to α; then v is
   carried back through the step with the Hessian-vector product v ← v − α (∂g_i/∂θ_i)ᵀ v. The gradient
   equals MTT's to float precision (``tests/test_mtt_tesla.py`` checks it in float64).
2. **Soft labels.** The students train with cross-entropy against the softmax of an expert's logits on the
   synthetic images instead of one-hot labels; the logits are stored on the distilled set as ``soft_labels``.
   The ``soft`` protocol evaluates such a set as TESLA's ``evaluate_synset`` does: cross-entropy against the
   softmax of those logits (the protocol's KL loss at temperature 1, which has the same gradient) at the learned
   lr; the ``standard`` protocol still trains on the hard labels.

Deviations from the official code, on purpose:

* Exact gradient. The official second pass back-propagates dL/dθ_N = 2(θ_N − θ*)/‖θ_0 − θ*‖² straight into
  each step's batch, i.e. it drops the terms by which a batch also changes the later steps' gradients (the
  Hessian-vector products above), and takes α's gradient with the summed step gradients held fixed; its image
  and α gradients are therefore not MTT's. This implementation keeps those terms, as TESLA's paper states its
  gradient (``notes/methods.md`` §6). The dropped terms are of order α per step, so the two gradients part as
  α and N grow, and ddbench's TESLA may land away from the published numbers there.
  Memory: it stores N detached parameter vectors (TESLA stores N detached gradients — the same size) and never
  more than one step's activations.
* Soft labels are assigned once, from the *initial* (real) synthetic images, by expert 0 (a fixed index, never
  chosen by accuracy) at the latest target epoch the schedule uses, max_start_epoch − 1 + expert_epochs; they
  stay fixed while the pixels move. The official code recomputes them every iteration with that iteration's
  target parameters on the current images — and its code path only runs for ImageNet (for other datasets it
  calls ``torch.cat`` on an empty list, which raises). ``soft_label_epoch`` picks another epoch.
* Soft labels are off by default: the official argparse default is off and its commands turn them on for
  ImageNet-1K only (``imagenet_ipc1`` here). What they do on digits (quick, distill seed 0, ConvNet, 3 seeds,
  hard-label ``standard`` protocol; ``results/cpu/2026-12-01-amd-epyc/tesla_soft_labels.log`` and the quick
  records): ipc 1 78.5 with them vs 91.1 without; ipc 10 94.4 vs 94.9 — the quick experts are under-confident
  (expert 0 at epoch 11: mean max-probability 0.55 on the test set), and at ipc 1 the teacher gives one class's
  only initial image a true-class probability of 0.11, so its soft label pulls that image towards other classes
  while the protocol still trains it as its own.
* Everything MTT's docstring lists (no test-set selection, generator-driven randomness, …).

Recipes: MTT's table, with the settings of the official TESLA readme where it gives a command — CIFAR-10 ipc 1
(max_start_epoch 5, no ZCA), CIFAR-100 ipc 50 (as MTT's), ImageNet-1K ipc 1 (64×64, ``--distill-arch
convnetd4``: syn_steps 10, expert_epochs 3, max_start_epoch 10, batch_syn 100, lr_img 1e4, lr_lr 1e-4, soft
labels; 50 experts of 50 epochs, its readme's buffer command). Other rows reuse MTT's values unverified against TESLA's paper (its tables could not be consulted here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bench.distilled import DistilledSet
from bench.errors import UserError
from bench.registry import register_method
from methods.base import DistillContext
from methods.mtt import MTT, FlatParams, GradientFn, MTTConfig, Trajectories, constant_memory_gradient


@dataclass
class TESLAConfig(MTTConfig):
    iterations: int = 10000  # the official TESLA default (MTT: 5000)
    soft_labels: bool = False  # students train on an expert's soft labels, stored on the set (official default: off)
    soft_label_epoch: int | None = None  # expert 0's epoch that assigns them; None: the latest target epoch


@register_method("tesla")
class TESLA(MTT):
    Config = TESLAConfig
    gradient: ClassVar[GradientFn] = staticmethod(constant_memory_gradient)

    recipes = {
        **MTT.recipes,
        "cifar10_ipc1": dict(MTT.recipes["cifar10_ipc1"], max_start_epoch=5, zca=False),
        "imagenet_ipc1": dict(syn_steps=10, expert_epochs=3, max_start_epoch=10, batch_syn=100, zca=False,
                                lr_img=1e4, lr_lr=1e-4, lr_teacher=0.01, soft_labels=True, num_experts=50),
    }
    quick = MTT.quick  # the CPU-sized copy; soft labels as the recipe says
    smoke = dict(MTT.smoke, soft_labels=True)  # the conformance test exercises the soft-label path

    def distill(self, ctx: DistillContext) -> DistilledSet:
        """MTT's distillation; a set with soft labels asks the ``soft`` protocol for TESLA's evaluation loss."""
        distilled = super().distill(ctx)
        if distilled.soft_labels is not None:
            distilled.metadata.setdefault("protocol_overrides", {})["soft"] = {"loss": "kl"}
        return distilled

    def student_targets(  # type: ignore[override]
        self, cfg: TESLAConfig, model: nn.Module, layout: FlatParams, trajectories: Trajectories, images: Tensor,
        labels: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Soft labels: expert 0's logits at ``soft_label_epoch`` on the initial images (see the docstring)."""
        if not cfg.soft_labels:
            return labels, None
        epoch = cfg.max_start_epoch - 1 + cfg.expert_epochs if cfg.soft_label_epoch is None else cfg.soft_label_epoch
        if not 0 <= epoch <= cfg.expert_train_epochs:
            raise UserError(f"soft_label_epoch {epoch} is outside the experts' epochs 0…{cfg.expert_train_epochs}")
        params = layout.unflatten(trajectories.params(0, epoch))
        with torch.no_grad():
            logits = torch.cat([functional_call(model, params, (chunk,)) for chunk in images.split(256)])
        return logits.softmax(dim=1), logits
