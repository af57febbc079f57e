"""Random real images — the coreset baseline every table in the field carries.

ipc real training images per class, drawn without replacement with the run's generator.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.distilled import DistilledSet
from bench.registry import register_method
from methods.base import DistillContext, Method, MethodConfig


@dataclass
class RandomConfig(MethodConfig):
    """Random selection has no knobs."""


@register_method("random")
class RandomSelection(Method):
    Config = RandomConfig

    def distill(self, ctx: DistillContext) -> DistilledSet:
        ctx.start(1)
        images, labels = ctx.real_init()
        ctx.report(0)
        return DistilledSet(images, labels)
