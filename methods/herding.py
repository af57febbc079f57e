"""Herding — the coreset baseline of DC (Zhao et al., ICLR 2021, Table 1), after Welling, "Herding Dynamical
Weights to Learn", ICML 2009 (as used for exemplar selection in iCaRL, Rebuffi et al., CVPR 2017).

A network is trained on the real training data; its penultimate-layer embedding (``embed``) is computed for
every training image. Per class, images are picked greedily so that the running mean of the picked
embeddings stays as close as possible to the class mean: at step k, pick the unpicked image i minimising
‖μ_c − (Σ_{j<k} φ_j + φ_i) / k‖. Selection is deterministic given the embedding network.

The embedding network is trained with the shared loop (``bench.evaluate.train_network``): SGD lr 0.01,
momentum 0.9, wd 5e-4, batch 256, DSA, lr ×0.1 at half, for ``embed_epochs`` epochs — the standard evaluation's
settings. This recipe is ddbench's choice: the official DC repository holds no herding code (its scripts load
precomputed herding sets), so which network, epochs and augmentation produced DC's herding rows is not known.
Embeddings are used as the network gives them, not L2-normalised as in iCaRL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.distilled import DistilledSet
from bench.evaluate import Protocol, train_network
from bench.models import embed
from bench.registry import register_method
from methods.base import DistillContext, Method, MethodConfig


@dataclass
class HerdingConfig(MethodConfig):
    embed_epochs: int = 50  # epochs of training for the embedding network on the real data
    lr: float = 0.01
    batch_size: int = 256


def herding_order(features: Tensor, count: int) -> list[int]:
    """Indices of ``count`` rows of ``features`` chosen greedily to keep their running mean near the mean."""
    mean = features.mean(dim=0)
    chosen: list[int] = []
    running_sum = torch.zeros_like(mean)
    available = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
    for k in range(1, count + 1):
        distance = ((mean - (running_sum + features) / k) ** 2).sum(dim=1)
        distance[~available] = float("inf")
        pick = int(distance.argmin())
        chosen.append(pick)
        available[pick] = False
        running_sum += features[pick]
    return chosen


@register_method("herding")
class Herding(Method):
    Config = HerdingConfig
    quick = {"embed_epochs": 10}
    smoke = {"embed_epochs": 1}

    def distill(self, ctx: DistillContext) -> DistilledSet:
        cfg: HerdingConfig = self.config  # type: ignore[assignment]
        data = ctx.dataset
        ctx.start(cfg.embed_epochs + 1)
        network = ctx.make_network()
        recipe = Protocol("herding-embedding", 1, "hard", "ce", cfg.embed_epochs, cfg.embed_epochs, cfg.lr, batch_size=cfg.batch_size)
        train_network(
            network, data.train_images, data.train_labels, recipe, ctx.generator, ctx.augmentation(),
            on_epoch=lambda epoch, loss: ctx.report(epoch, loss=loss),
        )
        network.eval()
        images, labels = [], []
        with torch.no_grad():
            for c in range(data.num_classes):
                class_images = data.images_of_class(c)
                features = torch.cat([embed(network, chunk) for chunk in class_images.split(512)])
                images.append(class_images[herding_order(features, ctx.ipc)])
                labels.append(torch.full((ctx.ipc,), c, dtype=torch.long, device=ctx.device))
        ctx.report(cfg.embed_epochs)
        return DistilledSet(torch.cat(images), torch.cat(labels))
