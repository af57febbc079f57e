"""The whole training set — the upper-bound row of every table, trained through the same evaluation loop."""

from __future__ import annotations

from dataclasses import dataclass

from bench.distilled import DistilledSet
from bench.registry import register_method
from methods.base import DistillContext, Method, MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """No knobs: every training image with its label."""


@register_method("full")
class FullDataset(Method):
    Config = FullConfig
    depends_on_ipc = False

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        ctx.report(0)
        return DistilledSet(ctx.dataset.train_images.clone(), ctx.dataset.train_labels.clone())
