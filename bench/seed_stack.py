"""The networks of one evaluation — one architecture, one network per seed — stacked into one model, so that a
single forward/backward trains every seed at once (``bench.evaluate``'s seed-batched path).

Parameters are stacked along a leading seed dimension (``torch.func.stack_module_state``): each seed keeps its
own values, and since the seeds' losses are summed before the backward pass, each stacked slice receives exactly
its own seed's gradient. Two forwards compute the stacked logits:

* **grouped convolutions** — for the DD networks whose features are a plain chain of convolutions, GroupNorms
  and channel-wise layers (ConvNet and its variants, AlexNet, VGG): the S seeds' channels lie side by side in
  one ``[batch, S·channels, h, w]`` tensor and every convolution runs with ``groups = S``, GroupNorm with
  S× the groups, and the classifier as one batched matrix product. This is what ``vmap`` does underneath, minus
  its per-op bookkeeping (on CPU, ConvNet at 8×8 and 28×28, it took 20–60 % less time per step than ``vmap`` in a
  comparison made at a64957b and not logged).
* **``torch.func.vmap``** over ``functional_call`` — any other architecture (ResNets, ViTs, timm models).
  ``randomness="error"``: a network that draws random numbers in its forward (dropout) cannot be batched.

On CUDA the grouped forward computes a 2×2, stride-2 average pool (ConvNet's) with ``HalvingAveragePool``: the
same forward kernel, and as backward the gradient spread over each window by one broadcast, where
``avg_pool2d``'s own backward kernel took a fifth of an H200's time in a batched ConvNet-3 step at CIFAR-10 shapes
(``benchmarks/batched_step_variants.py --profile``, 2026-11-30).

Networks that keep BatchNorm running statistics are never stacked: their in-place buffer updates are state that
vmap does not carry per seed; ``batching_unsupported_reason`` says so, and the evaluation trains them one at a time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from bench.models import ConvNormAct, DDNet

BATCHNORM_REASON = "BatchNorm running statistics cannot be vmapped"
RANDOMNESS_REASON = "the forward draws random numbers (e.g. dropout), which stacked seeds cannot draw as they do alone"
GROUPED_FORWARD = "grouped convolutions"
VMAP_FORWARD = "torch.func.vmap"

_CHAIN_CONTAINERS = (nn.Sequential, ConvNormAct)  # their forward applies the children in registration order
_CHANNEL_WISE = (nn.ReLU, nn.AvgPool2d, nn.MaxPool2d, nn.Identity, nn.AdaptiveAvgPool2d)


def _plain_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The (name, layer) chain of a DD network whose ``features`` are only convolutions (zero padding), GroupNorms
    and channel-wise layers, pooled by an identity or adaptive average pool into a linear classifier; None for
    any other network (its forward may do more than the chain says)."""
    if not isinstance(model, DDNet):
        return None
    for method in ("forward", "embed", "forward_head", "forward_features"):
        if getattr(type(model), method) is not getattr(DDNet, method):
            return None
    layers: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> bool:
        if type(module) in _CHAIN_CONTAINERS:
            return all(walk(f"{prefix}.{name}", child) for name, child in module.named_children())
        if (type(module) is nn.Conv2d and module.padding_mode == "zeros") or type(module) is nn.GroupNorm \
                or type(module) in _CHANNEL_WISE:
            layers.append((prefix, module))
            return True
        return False

    if not walk("features", model.features):
        return None
    if type(model.global_pool) not in (nn.Identity, nn.AdaptiveAvgPool2d) or type(model.classifier) is not nn.Linear:
        return None
    return layers + [("global_pool", model.global_pool)]


def forward_kind(model: nn.Module) -> str:
    """How a stack of ``model``'s architecture computes its logits: grouped convolutions or ``torch.func.vmap``."""
    return GROUPED_FORWARD if _plain_chain(model) is not None else VMAP_FORWARD


def has_batchnorm_statistics(model: nn.Module) -> bool:
    """Whether any layer of ``model`` keeps BatchNorm running statistics (updated in place by every forward)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in model.modules())


class HalvingAveragePool(torch.autograd.Function):
    """``F.avg_pool2d(x, 2, 2)`` (no padding, floor mode) with a backward that is one broadcast: each output
    gradient, divided by 4, copied to its 2×2 window (zero for a last odd row or column, which the pool drops) —
    the gradient ``avg_pool2d`` computes, up to rounding."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.input_shape = x.shape
        return F.avg_pool2d(x, 2, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        batch, channels, height, width = ctx.input_shape
        h, w = grad.shape[2], grad.shape[3]
        spread = (grad / 4).reshape(batch, channels, h, 1, w, 1).expand(batch, channels, h, 2, w, 2)
        spread = spread.reshape(batch, channels, 2 * h, 2 * w)
        if (2 * h, 2 * w) != (height, width):
            spread = F.pad(spread, (0, width - 2 * w, 0, height - 2 * h))
        return spread


def _is_halving_average_pool(layer: nn.Module) -> bool:
    return (type(layer) is nn.AvgPool2d and layer.kernel_size in (2, (2, 2)) and layer.stride in (2, (2, 2))
            and layer.padding in (0, (0, 0)) and not layer.ceil_mode and layer.divisor_override is None)


class SeedStack:
    """S networks of one architecture (``models``, one per seed) as one model with stacked parameters.

    ``grouped=False`` computes with ``vmap`` even where grouped convolutions could (for comparisons).
    ``logits`` runs every seed's network on its own inputs (``[S, batch, ...]``) or on inputs shared by all
    (``shared=True``, ``[batch, ...]``, e.g. the test set); ``losses`` gives one loss per seed. ``parameters``
    are the stacked leaves an optimiser updates; ``write_back`` copies them into the networks.
    """

    def __init__(self, models: list[nn.Module], grouped: bool = True):
        if not models:
            raise ValueError("SeedStack needs at least one network")
        self.models = models
        self.size = len(models)
        self.params, self.buffers = stack_module_state(models)
        self.skeleton = models[0]  # functional_call swaps the stacked tensors in for the call only
        self.chain = _plain_chain(models[0]) if grouped else None
        self.forward_kind = GROUPED_FORWARD if self.chain is not None else VMAP_FORWARD
        self.memory_format = torch.contiguous_format  # of the grouped forward's activations (channels_last: to compare)
        self.halving_pool = True  # HalvingAveragePool on CUDA (False: avg_pool2d's own backward, to compare)

    @property
    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> "SeedStack":
        self.skeleton.train(mode)
        return self

    def eval(self) -> "SeedStack":
        return self.train(False)

    def logits(self, inputs: Tensor, shared: bool = False) -> Tensor:
        """``[S, batch, classes]``: each seed's network on ``inputs[s]`` (or on ``inputs`` itself when ``shared``)."""
        if self.chain is not None:
            return self._grouped_logits(inputs, shared)
        run_one: Callable[[dict, dict, Tensor], Tensor] = lambda params, buffers, x: functional_call(
            self.skeleton, (params, buffers), (x,))
        return vmap(run_one, in_dims=(0, 0, None if shared else 0), randomness="error")(self.params, self.buffers, inputs)

    def losses(self, loss: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor) -> Tensor:
        """``[S]``: every seed's loss on its own inputs; ``loss`` maps the ``[S, batch, classes]`` logits and the
        ``[S, ...]`` targets to one loss per seed."""
        return loss(self.logits(inputs), targets)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy every seed's stacked parameters and buffers into its network."""
        for s, model in enumerate(self.models):
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                stacked = self.params.get(name, self.buffers.get(name))
                if stacked is not None:
                    tensor.copy_(stacked[s])

    def _grouped_logits(self, inputs: Tensor, shared: bool) -> Tensor:
        S, params = self.size, self.params
        stacked = not shared
        if shared:
            h = inputs
        else:  # [S, B, C, H, W] → [B, S·C, H, W]: seed s owns channels s·C … (s+1)·C − 1
            h = inputs.transpose(0, 1).reshape(inputs.shape[1], -1, *inputs.shape[3:])
        h = h.contiguous(memory_format=self.memory_format)

        def stack_shared(x: Tensor) -> Tensor:
            return x.repeat(1, S, 1, 1)

        for name, layer in self.chain or []:
            if isinstance(layer, nn.Conv2d):
                weight = params[f"{name}.weight"]
                weight = weight.reshape(S * weight.shape[1], *weight.shape[2:])
                bias = params.get(f"{name}.bias")
                bias = None if bias is None else bias.reshape(-1)
                if stacked:
                    groups = S * layer.groups
                elif layer.groups == 1:  # one input for every seed: an ordinary conv with S× the output channels
                    groups = 1
                else:
                    h, groups = stack_shared(h), S * layer.groups
                stacked = True
                h = F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, groups)
            elif isinstance(layer, nn.GroupNorm):
                if not stacked:
                    h, stacked = stack_shared(h), True
                weight, bias = params.get(f"{name}.weight"), params.get(f"{name}.bias")
                h = F.group_norm(h, S * layer.num_groups, None if weight is None else weight.reshape(-1),
                                 None if bias is None else bias.reshape(-1), layer.eps)
            elif self.halving_pool and h.is_cuda and _is_halving_average_pool(layer):
                h = HalvingAveragePool.apply(h)
            else:
                h = layer(h)
        if not stacked:
            h = stack_shared(h)
        features = h.reshape(h.shape[0], S, -1).transpose(0, 1)  # [S, B, features], each seed's flatten(1)
        weight, bias = params["classifier.weight"], params.get("classifier.bias")
        if bias is None:
            return torch.bmm(features, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


def batching_unsupported_reason(models: list[nn.Module], example: Tensor, loss: Callable[[Tensor, Tensor], Tensor],
                                target: Tensor) -> str | None:
    """Why these networks cannot be trained stacked (None: they can). ``example`` (one input batch) and
    ``target`` are pushed through one stacked forward and backward (``loss``: as for ``SeedStack.losses``),
    without changing any network."""
    if has_batchnorm_statistics(models[0]):
        return BATCHNORM_REASON
    try:
        stack = SeedStack(models).train()
        inputs = example.unsqueeze(0).expand(len(models), *example.shape)
        targets = target.unsqueeze(0).expand(len(models), *target.shape)
        torch.autograd.grad(stack.losses(loss, inputs, targets).sum(), stack.parameters, allow_unused=True)
    except Exception as exc:  # any failure of vmap or the stacked forward: the networks train one at a time
        if "randomness error mode" in str(exc):
            return RANDOMNESS_REASON
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"the stacked forward failed ({type(exc).__name__}: {first_line[:200]})"
    return None
