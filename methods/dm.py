"""DM — Dataset Condensation with Distribution Matching (Zhao & Bilen, WACV 2023). Official code:
VICO-UoE/DatasetCondensation, ``main_DM.py``.

The idea: a good synthetic set S of a class should look like the real set T of that class *to any network*.
DM compares them in the feature spaces of randomly initialised networks — no training, no bi-level loop:

* every **iteration** draws a fresh randomly initialised network ψ (the ConvNet; never trained, its weights
  frozen) and uses its embedding (the features before the linear classifier, ``bench.models.embed``);
* for every class c: a real batch of class c (``batch_real`` images) and the ipc synthetic images of class c,
  both augmented by one differentiable siamese augmentation (DSA, the same parameters for both, a fresh draw
  per class); the loss adds ‖mean ψ(real_c) − mean ψ(syn_c)‖² (squared distance of the mean embeddings —
  maximum mean discrepancy with a linear kernel);
* one SGD step on the synthetic images (``lr_img``, momentum ``img_momentum``) on the summed loss.

It is cheap (one forward pass of each batch per class), which makes it the fast baseline of the family.
The network is in train mode, as in the official code: for the default instance-norm ConvNet this changes
nothing; for BatchNorm networks the official code embeds all classes in *one* batch (so that the batch
statistics mix classes), which ``matching_loss`` does too.

Recipes: lr_img 1 for ipc 1/10/50 (and CIFAR-100 up to 125), 10 for CIFAR-10 ipc ≥ 100 (official readme);
20,000 iterations; initialisation from real images; DSA on (flip dropped for digits, by the harness).

Deviations from the official code, on purpose: randomness (networks, real batches, augmentation) flows from
the harness's generator (the official code reseeds the global RNG from the clock for every siamese draw);
exactly ``iterations`` updates (the official loop runs ``Iteration + 1`` but scores its set at ``it == Iteration``,
before the last one: the same set); the real embeddings are computed
under ``no_grad`` (the official code detaches them afterwards — the same values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.augment import DSA
from bench.distilled import DistilledSet
from bench.models import embed
from bench.registry import register_method
from methods.base import DistillContext, Init, Method, MethodConfig
from methods.dc import batchnorm_layers, initial_images


@dataclass
class DMConfig(MethodConfig):
    iterations: int = 20000  # image updates, each with a freshly initialised (untrained) network
    lr_img: float = 1.0  # SGD learning rate of the synthetic images (10 for CIFAR-10 ipc ≥ 100)
    img_momentum: float = 0.5  # SGD momentum of the synthetic images
    batch_real: int = 256  # real images of one class per class term
    init: Init = "real"  # "real" (random real images) or "noise" (standard normal, in the normalised space)
    dsa: bool = True  # siamese DSA on the real and synthetic batch of every class term


@register_method("dm")
class DM(Method):
    Config = DMConfig
    recipes = {
        **{f"{dataset}_ipc{ipc}": {"lr_img": 1.0}
           for dataset in ("mnist", "fashion_mnist", "svhn", "cifar10", "cifar100") for ipc in (1, 10, 50)},
        **{f"cifar10_ipc{ipc}": {"lr_img": 10.0} for ipc in (100, 200, 500, 1000, 1250)},
        **{f"cifar100_ipc{ipc}": {"lr_img": 1.0} for ipc in (100, 125)},
        # MNIST ipc 1 sized for a 2-core CPU (distillation 288 s in the committed
        # results/cpu/2026-12-01-amd-epyc/mnist_cpu records; distil without --quick, which would override it):
        # 200 iterations instead of 20,000 and real batches of 64 instead of 256.
        "mnist_ipc1_cpu": {"iterations": 200, "batch_real": 64},
    }
    # Applied on top of any recipe with --quick (the digits bench): 1/133 of the iterations, nothing else changed.
    quick = {"iterations": 150}
    smoke = {"iterations": 3, "batch_real": 16}

    def matching_loss(self, net: nn.Module, images: Tensor, ctx: DistillContext, augment: DSA | None) -> Tensor:
        """Σ over classes of the squared distance between the mean embeddings of real and synthetic images."""
        cfg: DMConfig = self.config  # type: ignore[assignment]
        joint = bool(batchnorm_layers(net))  # BatchNorm: one batch of all classes, as the official code
        reals, syns = [], []
        loss = images.new_zeros(())
        for _, real, syn in ctx.class_batches(images, cfg.batch_real, augment):
            if joint:
                reals.append(real)
                syns.append(syn)
                continue
            with torch.no_grad():
                mean_real = embed(net, real).mean(dim=0)
            loss = loss + ((mean_real - embed(net, syn).mean(dim=0)) ** 2).sum()
        if joint:
            with torch.no_grad():
                emb_real = embed(net, torch.cat(reals))
            emb_syn = embed(net, torch.cat(syns))
            for real_c, syn_c in zip(emb_real.split([len(r) for r in reals]), emb_syn.split([len(s) for s in syns])):
                loss = loss + ((real_c.mean(dim=0) - syn_c.mean(dim=0)) ** 2).sum()
        return loss

    def distill(self, ctx: DistillContext) -> DistilledSet:
        cfg: DMConfig = self.config  # type: ignore[assignment]
        augment = ctx.augmentation() if cfg.dsa else None
        initial, labels = initial_images(ctx, cfg.init)
        images = initial.detach().clone().requires_grad_(True)
        optimizer = torch.optim.SGD([images], lr=cfg.lr_img, momentum=cfg.img_momentum)
        ctx.start(cfg.iterations)
        for iteration in range(cfg.iterations):
            net = ctx.make_network()
            net.train()
            net.requires_grad_(False)
            loss = self.matching_loss(net, images, ctx, augment)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ctx.report(iteration, loss=loss.detach() / ctx.dataset.num_classes)
        return DistilledSet(images.detach(), labels)

