"""Architectures of the dataset-distillation literature, registered in timm's own model registry.

Every architecture, ours or any timm model, is made by
``timm.create_model(name, num_classes=..., in_chans=..., img_size=...)``; the harness goes through
``create_network``, which also parses overrides (``convnet[width=64,norm=batch]``) and seeds the weights.

Sources:

* ConvNet — the depth-``d`` conv3×3 → norm → ReLU → pool stack of Gidaris & Komodakis, "Dynamic Few-Shot
  Visual Learning without Forgetting", CVPR 2018, as adopted by DC (Zhao, Mopuri & Bilen, "Dataset
  Condensation with Gradient Matching", ICLR 2021) and used unchanged by DSA, DM, MTT (Cazenavette et al.,
  CVPR 2022) and APM. Its "instance norm" is ``nn.GroupNorm(C, C, affine=True)``; depth 3 at 32×32,
  4 at 64×64, 5 at 128×128.
* AlexNet, VGG11 and ResNet18, CIFAR-style — ``AlexNet``, ``VGG11``/``VGG11BN`` and
  ``ResNet18``/``ResNet18BN`` of the DC code, VICO-UoE/DatasetCondensation ``networks.py``.
* A small ViT for low resolutions, made from timm's ``VisionTransformer`` (Dosovitskiy et al., ICLR 2021).

Deviations from the DC code, all so that any square input from 8×8 up works:

* Feature sizes are computed from ``img_size``. As in DC, a 28×28 input (MNIST, Fashion-MNIST) gets a
  first-conv padding of 3, so it is processed as 32×32 (4×4 features at depth 3); every other size pads by 1.
* ``layer`` norm is ``GroupNorm(1, C)`` (per-channel affine) rather than DC's ``LayerNorm([C, H, W])``.
* AlexNet, VGG and ResNet skip a downsampling step (max pool, or a stage's stride 2) that would leave a later
  conv a map smaller than 2×2, or the output smaller than 1×1: GroupNorm(C, C) of a 1×1 map is a constant,
  which would cut the input off from the logits. At 32×32 and at DC's 28×28 setups nothing is skipped, so
  the networks are DC's; at 8×8 VGG11 keeps its last four convs at 2×2 and ResNet18's last stage at 2×2.
* ResNet18 pools adaptively to 1×1 (DC: ``avg_pool2d(out, 4)``, the same at 32×32 and 28×28).
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from collections import OrderedDict
from typing import Any, Callable, ContextManager

import timm
import torch
import torch.nn.functional as F
import yaml
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from bench.errors import UnknownNameError, UserError
from bench.registry import nearest_name, unknown_name_message

__all__ = [
    "OUR_ARCHS",
    "ConvNet",
    "AlexNetCifar",
    "VGGCifar",
    "ResNetCifar",
    "parse_arch",
    "split_arch_list",
    "check_arch",
    "create_network",
    "embed",
]  # register_model appends the constructors

NORMS = ("instance", "batch", "layer", "none")
POOLINGS = ("avg", "max", "none")
RESERVED_ARGS = ("num_classes", "in_chans", "img_size", "pretrained")


# ----------------------------------------------------------------------------------------------------------
# building blocks


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm '{kind}'; expected one of {', '.join(NORMS)}")


def make_pool(kind: str) -> nn.Module:
    if kind == "avg":
        return nn.AvgPool2d(kernel_size=2, stride=2)
    if kind == "max":
        return nn.MaxPool2d(kernel_size=2, stride=2)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling '{kind}'; expected one of {', '.join(POOLINGS)}")


def can_halve(side: int, convs_follow: bool) -> bool:
    """Whether a 2×2 pool may act on a ``side``×``side`` map (see the module docstring)."""
    return side // 2 >= (2 if convs_follow else 1)


def default_depth(img_size: int) -> int:
    """ConvNet depth for a resolution: 8→1, 16→2, 28/32→3, 64→4, 128→5."""
    return max(1, round(math.log2(img_size)) - 2)


def vit_patch_size(img_size: int) -> int:
    """The largest divisor of ``img_size`` not above ``img_size // 8``: 32→4, 8→1, 64→8, 28→2."""
    target = max(1, img_size // 8)
    return max(p for p in range(1, target + 1) if img_size % p == 0)


class ConvNormAct(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 3, padding: int = 1, norm: str = "instance"):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, kernel_size, padding=padding)
        self.norm = make_norm(norm, out_chans)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chans: int, out_chans: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, out_chans)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride=stride, bias=False), make_norm(norm, out_chans)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


# ----------------------------------------------------------------------------------------------------------
# networks


class DDNet(nn.Module):
    """``features`` → ``global_pool`` → flatten → ``classifier``, with timm's ``forward_features`` and
    ``forward_head``.

    ``embed(x)`` is the flattened input of the classifier (used by distribution matching and herding).
    """

    features: nn.Module
    global_pool: nn.Module
    classifier: nn.Linear
    num_classes: int
    num_features: int

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.classifier(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.embed(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier


class ConvNet(DDNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        width: int = 128,
        depth: int | None = None,
        norm: str = "instance",
        pooling: str = "avg",
    ):
        super().__init__()
        depth = default_depth(img_size) if depth is None else depth
        if depth < 1:
            raise ValueError(f"ConvNet depth must be at least 1, got {depth}")
        if width < 1:
            raise ValueError(f"ConvNet width must be at least 1, got {width}")
        first_pad = 3 if img_size == 28 else 1
        blocks, side = [], img_size + 2 * (first_pad - 1)
        for i in range(depth):
            conv = ConvNormAct(in_chans if i == 0 else width, width, padding=first_pad if i == 0 else 1, norm=norm)
            blocks.append(nn.Sequential(conv, make_pool(pooling)))
            if pooling != "none":
                side //= 2
        if side < 1:
            raise ValueError(
                f"ConvNet of depth {depth} pools a {img_size}×{img_size} input away; "
                f"use depth ≤ {img_size.bit_length() - 1} or pooling=none"
            )
        self.features = nn.Sequential(*blocks)
        self.global_pool = nn.Identity()
        self.num_classes = num_classes
        self.num_features = width * side * side
        self.classifier = nn.Linear(self.num_features, num_classes)


class AlexNetCifar(DDNet):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, norm: str = "none"):
        super().__init__()
        first_pad = 4 if in_chans == 1 else 2
        plan = [(128, 5, first_pad, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True)]
        layers, chans, side = [], in_chans, img_size
        for i, (out_chans, kernel, pad, pool) in enumerate(plan):
            layers.append(ConvNormAct(chans, out_chans, kernel, pad, norm))
            chans, side = out_chans, side + 2 * pad - kernel + 1
            if pool and can_halve(side, convs_follow=i < len(plan) - 1):
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                side //= 2
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.Identity()
        self.num_classes = num_classes
        self.num_features = chans * side * side
        self.classifier = nn.Linear(self.num_features, num_classes)


VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGGCifar(DDNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        norm: str = "instance",
        cfg: list[int | str] | None = None,
    ):
        super().__init__()
        cfg = VGG11_CFG if cfg is None else cfg
        first_pad = 3 if in_chans == 1 and img_size == 28 else 1  # DC: MNIST's 28×28 becomes 32×32
        layers, chans, side = [], in_chans, img_size + 2 * (first_pad - 1)
        for i, v in enumerate(cfg):
            if v == "M":
                if can_halve(side, convs_follow=any(w != "M" for w in cfg[i + 1 :])):
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    side //= 2
            else:
                layers.append(ConvNormAct(chans, int(v), 3, first_pad if i == 0 else 1, norm))
                chans = int(v)
        self.features = nn.Sequential(*layers)
        self.global_pool = nn.Identity()
        self.num_classes = num_classes
        self.num_features = chans * side * side
        self.classifier = nn.Linear(self.num_features, num_classes)


class ResNetCifar(DDNet):
    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        img_size: int = 32,
        norm: str = "instance",
        layers: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
    ):
        super().__init__()
        stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False), make_norm(norm, widths[0]), nn.ReLU()
        )
        stages, chans, side = [("stem", stem)], widths[0], img_size
        for i, (blocks, out_chans) in enumerate(zip(layers, widths)):
            stride = 2 if i > 0 and side >= 3 else 1  # a 3×3/stride-2 conv maps side s to ceil(s / 2)
            side = (side + 1) // 2 if stride == 2 else side
            stage = [BasicBlock(chans, out_chans, stride, norm)]
            stage += [BasicBlock(out_chans, out_chans, 1, norm) for _ in range(blocks - 1)]
            stages.append((f"layer{i + 1}", nn.Sequential(*stage)))
            chans = out_chans
        self.features = nn.Sequential(OrderedDict(stages))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.num_features = chans
        self.classifier = nn.Linear(self.num_features, num_classes)


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Pre-logit features of any network: ``model.embed``, or timm's ``forward_head(..., pre_logits=True)``."""
    if hasattr(model, "embed"):
        return model.embed(x)
    return model.forward_head(model.forward_features(x), pre_logits=True)


# ----------------------------------------------------------------------------------------------------------
# registered constructors

OUR_ARCHS: list[str] = []


def _register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    OUR_ARCHS.append(fn.__name__)
    return register_model(fn)


def _build(cls: type[nn.Module], name: str, pretrained: bool, kwargs: dict[str, Any], **defaults: Any) -> Any:
    if pretrained:
        raise ValueError(f"'{name}' has no pretrained weights; create it with pretrained=False")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    _check_argument_types(cls, kwargs)
    return cls(**{**defaults, **kwargs})


_PLAIN_TYPES = (bool, int, float, str)


def _check_argument_types(cls: type[nn.Module], kwargs: dict[str, Any]) -> None:
    """``ValueError`` naming the argument when a value does not have the plain type (``int``, ``float``, ``str``,
    ``bool``, or ``None`` where allowed) that ``cls``'s constructor declares: ``convnet[width=abc]`` says so,
    rather than failing somewhere inside the constructor."""
    hints = typing.get_type_hints(cls.__init__)
    for key, value in kwargs.items():
        hint = hints.get(key)
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if not all(t in (*_PLAIN_TYPES, type(None)) for t in allowed):
            continue  # not a plain type: the constructor checks it
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False  # a YAML true/false is not a number
        else:
            ok = any(isinstance(value, t) for t in allowed if t is not type(None)) or \
                (float in allowed and isinstance(value, int))
        if not ok:
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{key} must be {names}, got {value!r}")


@_register
def convnet(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet", pretrained, kwargs)


@_register
def convnet_bn(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_bn", pretrained, kwargs, norm="batch")


@_register
def convnet_ln(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_ln", pretrained, kwargs, norm="layer")


@_register
def convnet_nn(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_nn", pretrained, kwargs, norm="none")


@_register
def convnet_maxpool(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_maxpool", pretrained, kwargs, pooling="max")


@_register
def convnetd1(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnetd1", pretrained, kwargs, depth=1)


@_register
def convnetd2(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnetd2", pretrained, kwargs, depth=2)


@_register
def convnetd3(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnetd3", pretrained, kwargs, depth=3)


@_register
def convnetd4(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnetd4", pretrained, kwargs, depth=4)


@_register
def convnetd5(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnetd5", pretrained, kwargs, depth=5)


@_register
def convnet_w32(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_w32", pretrained, kwargs, width=32)


@_register
def convnet_w64(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_w64", pretrained, kwargs, width=64)


@_register
def convnet_w256(pretrained: bool = False, **kwargs: Any) -> ConvNet:
    return _build(ConvNet, "convnet_w256", pretrained, kwargs, width=256)


@_register
def alexnet_cifar(pretrained: bool = False, **kwargs: Any) -> AlexNetCifar:
    return _build(AlexNetCifar, "alexnet_cifar", pretrained, kwargs)


@_register
def alexnet_cifar_bn(pretrained: bool = False, **kwargs: Any) -> AlexNetCifar:
    return _build(AlexNetCifar, "alexnet_cifar_bn", pretrained, kwargs, norm="batch")


@_register
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    return _build(VGGCifar, "vgg11_cifar", pretrained, kwargs)


@_register
def vgg11_cifar_bn(pretrained: bool = False, **kwargs: Any) -> VGGCifar:
    return _build(VGGCifar, "vgg11_cifar_bn", pretrained, kwargs, norm="batch")


@_register
def resnet18_cifar(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    return _build(ResNetCifar, "resnet18_cifar", pretrained, kwargs)


@_register
def resnet18_cifar_bn(pretrained: bool = False, **kwargs: Any) -> ResNetCifar:
    return _build(ResNetCifar, "resnet18_cifar_bn", pretrained, kwargs, norm="batch")


@_register
def vit_tiny_cifar(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    img_size = kwargs.pop("img_size", 32)
    return _build(
        VisionTransformer,
        "vit_tiny_cifar",
        pretrained,
        kwargs,
        img_size=img_size,
        patch_size=vit_patch_size(img_size),
        embed_dim=192,
        depth=6,
        num_heads=3,
        mlp_ratio=4.0,
        class_token=True,
    )


# ----------------------------------------------------------------------------------------------------------
# specs: "name" or "name[key=value,...]", and the one factory the harness uses

_SPEC = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[(.*)\])?\s*", re.DOTALL)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _split_top_level(text: str, context: str) -> list[str]:
    """Split on commas outside square brackets; unbalanced brackets raise ``UserError`` prefixed by ``context``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise UserError(f"{context}: unmatched ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"{context}: unclosed '['")
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_value(raw: str, spec: str) -> Any:
    if _EXPONENT.fullmatch(raw):
        return float(raw)  # YAML 1.1 reads 1e-3 as a string
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"architecture '{spec}': cannot read the value '{raw}'") from None


def parse_arch(spec: str) -> tuple[str, dict[str, Any]]:
    """``"convnet[width=64,norm=batch]"`` → ``("convnet", {"width": 64, "norm": "batch"})``."""
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise UserError(f"malformed architecture '{spec}'; expected name or name[key=value,...]")
    name, body = match.group(1), match.group(2)
    overrides: dict[str, Any] = {}
    if body is None or not body.strip():
        return name, overrides
    for item in _split_top_level(body, f"architecture '{spec}'"):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or not _KEY.fullmatch(key) or not raw:
            raise UserError(f"architecture '{spec}': '{item}' is not key=value")
        if key in overrides:
            raise UserError(f"architecture '{spec}': '{key}' is given twice")
        if key in RESERVED_ARGS:
            raise UserError(f"architecture '{spec}': '{key}' is set by the harness, not the spec")
        overrides[key] = _parse_value(raw, spec)
    return name, overrides


def split_arch_list(text: str) -> list[str]:
    """``"convnet,vit_tiny_patch16_224[patch_size=2,depth=4]"`` → the two specs; empty items are dropped."""
    return [p for p in _split_top_level(text, f"architecture list '{text}'") if p]


def check_arch(spec: str) -> None:
    """Raise ``UserError`` for a malformed spec, ``UnknownNameError`` for a name timm does not know."""
    name, _ = parse_arch(spec)
    if timm.is_model(name):
        return
    timm_names = timm.list_models()
    near = nearest_name(name, OUR_ARCHS + timm_names)
    shown = OUR_ARCHS + ([near] if near and near not in OUR_ARCHS else [])
    message = unknown_name_message("architecture", name, shown)
    raise UnknownNameError(f"{message}, or any of timm's {len(timm_names)} models (timm.list_models())")


def attention_with_second_derivative() -> ContextManager:
    """Scaled-dot-product attention (timm's ViTs) through its math kernel inside the block: the fused kernels
    (flash, memory-efficient) have no derivative of their backward pass, which gradient matching and unrolled
    student training take. Same function, other rounding; architectures without attention are untouched."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _nearest_option_hint(name: str, error: str, num_classes: int, in_chans: int) -> str:
    """"; did you mean 'width'?" for an option the model's constructor does not take (``convnet[widht=64]``), found
    among the parameters of the class that timm builds for ``name`` with its defaults (built only on this error)."""
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", error)
    if unexpected is None:
        return ""
    try:
        model_class = type(timm.create_model(name, num_classes=num_classes, in_chans=in_chans))
    except Exception:  # noqa: BLE001 — only a hint: without it the error still names the option
        return ""
    options = [p for p in inspect.signature(model_class.__init__).parameters if p not in ("self", "args", "kwargs")]
    near = nearest_name(unexpected.group(1), options)
    return f"; did you mean '{near}'?" if near else ""


def create_network(spec: str, num_classes: int, in_chans: int, img_size: int, generator: torch.Generator) -> nn.Module:
    """Build ``spec`` on the CPU with weights drawn from ``generator``; the global RNG is left as it was.

    ``img_size`` is passed to every model whose constructor takes it (ours, ViTs), not to the others (timm's
    ResNets). A spec the model cannot be built with raises ``UserError``.
    """
    check_arch(spec)
    name, overrides = parse_arch(spec)
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())
    args = dict(num_classes=num_classes, in_chans=in_chans, **overrides)
    where = f"architecture '{spec}' at {in_chans}×{img_size}×{img_size}"
    with torch.random.fork_rng(devices=[]):
        try:
            try:
                torch.default_generator.manual_seed(seed)
                return timm.create_model(name, img_size=img_size, **args)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
            torch.default_generator.manual_seed(seed)
            return timm.create_model(name, **args)
        except TypeError as e:
            if "unexpected keyword argument" not in str(e):
                raise
            raise UserError(f"{where}: {e}{_nearest_option_hint(name, str(e), num_classes, in_chans)}") from e
        except ValueError as e:
            raise UserError(f"{where}: {e}") from e
