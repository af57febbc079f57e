"""The whole training set — the upper-bound row of every table, trained through the same evaluation loop.

Under ``--quick`` the evaluation trains for ``QUICK_EPOCHS`` epochs instead of the quick protocol's 300: an epoch of
the whole training set is many mini-batches (digits: 1,437 images, 6 steps of 256), where an epoch of a distilled
set is one, so 100 epochs are still twice the optimiser steps a quick distilled set gets. The record's
``protocol_config`` shows the epochs that ran. The full recipes (no ``--quick``) train for the protocol's epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.distilled import DistilledSet
from bench.evaluate import PROTOCOLS
from bench.registry import register_method
from methods.base import DistillContext, Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """No knobs: every training image with its label."""


QUICK_EPOCHS = 100


@register_method("full")
class FullDataset(Method):
    Config = FullConfig
    depends_on_ipc = False

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        ctx.report(0)
        overrides = {name: {"quick_epochs": QUICK_EPOCHS} for name in PROTOCOLS.names()}
        return DistilledSet(ctx.dataset.train_images.clone(), ctx.dataset.train_labels.clone(),
                            metadata={"protocol_overrides": overrides})
