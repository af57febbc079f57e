"""The whole training set — the upper-bound row of every table, trained through the same evaluation loop.

Under ``--quick`` the evaluation trains for ``quick_eval_epochs`` (50) epochs instead of the quick protocol's
300: an epoch of the whole training set is many mini-batches (digits: 1,437 images, 6 steps of 256), where an
epoch of a distilled set of up to 256 images is one, so 50 epochs give the 300 optimiser steps a quick distilled
set gets. It is part of the quick config, so records (``config``, ``protocol_config``) show it and ``--resume``
never takes a record made with other epochs for this one. The full recipes (no ``--quick``) train for the protocol's epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.distilled import DistilledSet
from bench.evaluate import PROTOCOLS
from bench.registry import register_method
from methods.base import DistillContext, Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Every training image with its label."""

    quick_eval_epochs: int | None = None  # under --quick: evaluation epochs (None: the protocol's quick epochs)


@register_method("full")
class FullDataset(Method):
    Config = FullConfig
    depends_on_ipc = False
    quick = {"quick_eval_epochs": 50}

    def distill(self, ctx: DistillContext) -> DistilledSet:
        cfg: FullConfig = self.config  # type: ignore[assignment]
        ctx.start(1)
        ctx.report(0)
        handed = {} if cfg.quick_eval_epochs is None else {
            "protocol_overrides": {name: {"quick_epochs": cfg.quick_eval_epochs} for name in PROTOCOLS.names()}}
        return DistilledSet(ctx.dataset.train_images.clone(), ctx.dataset.train_labels.clone(), metadata=handed)
