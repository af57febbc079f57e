"""DSA — differentiable siamese augmentation (Zhao & Bilen, "Dataset Condensation with Differentiable Siamese
Augmentation", ICML 2021).

Each call picks ONE operation family at random from the strategy (``color`` = brightness, saturation and
contrast in turn; ``crop``; ``cutout``; ``flip``; ``scale``; ``rotate``) and applies it with random
parameters; every operation is differentiable in the images (affine grids + ``grid_sample``, masks, index
gathers), so gradients reach synthetic images through it.

*Siamese*: a matching step augments the real and the synthetic batch with the *same* sampled operation and
parameters. As in the official code's batch mode, siamese parameters are batch-wide (one value shared by every
image of both batches); non-siamese calls (evaluation training) draw per-image parameters.

Deviation from the official code, on purpose: parameters come from a ``torch.Generator`` handed in by the
caller, instead of re-seeding the global RNG before every draw.

Scale and rotate resample with ``align_corners=True``. The official code passes nothing, which under the torch it
pins (1.2) meant True and under torch ≥ 1.3 means False; True is what its authors ran, and MTT's copy of these
operations sets it explicitly.

``pack`` / ``apply_packed`` compute ``augment_each``'s images without branching on the drawn operations (every
operation on every image, each image keeping its own): what a CUDA graph of a whole training step replays
(``bench.evaluate._CudaGraphSteps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

ALL_OPERATIONS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# Each operation's parameters, and values that leave an image unchanged (``pack`` fills them in where an image's
# batch drew another operation; ``apply_dense`` discards those outputs anyway). Their Python types are the types
# ``DSA.sample`` draws: int for torch.randint's int64, bool for the flip mask, float for torch.rand's float32.
IDENTITY = {
    "color": {"brightness": 0.0, "saturation": 1.0, "contrast": 1.0},
    "crop": {"shift_x": 0, "shift_y": 0},
    "cutout": {"centre_x": -1_000_000, "centre_y": -1_000_000},
    "flip": {"flip": False},
    "scale": {"sx": 1.0, "sy": 1.0},
    "rotate": {"angle": 0.0},
}


@dataclass(frozen=True)
class DSAConfig:
    """Strengths from the official ``ParamDiffAug``."""

    brightness: float = 1.0  # x + (u − 0.5) · 1.0
    saturation: float = 2.0  # channel-mean-centred scaling by u · 2.0
    contrast: float = 0.5  # image-mean-centred scaling by u + 0.5
    crop: float = 0.125  # translate by up to 12.5 % of the side, zero padding
    cutout: float = 0.5  # zero a square of half the side
    flip: float = 0.5  # horizontal flip probability
    scale: float = 1.2  # independent x/y scale in [1/1.2, 1.2]
    rotate: float = 15.0  # degrees, uniform in [−15, 15]


@dataclass
class AugmentParams:
    """One sampled augmentation: the operation family and its parameter tensors (batch size n, or 1 = shared)."""

    operation: str
    values: dict[str, Tensor] = field(default_factory=dict)


class DSA:
    """Differentiable siamese augmentation over a fixed strategy (a tuple of operation families)."""

    def __init__(self, strategy: tuple[str, ...] = ALL_OPERATIONS, config: DSAConfig = DSAConfig()):
        unknown = set(strategy) - set(ALL_OPERATIONS)
        if unknown or not strategy:
            raise ValueError(f"unknown DSA operations {sorted(unknown)}; choose from {ALL_OPERATIONS}")
        self.strategy = tuple(strategy)
        self.config = config

    @classmethod
    def for_dataset(cls, digit_like: bool) -> "DSA":
        """The standard strategy; digits must not be mirrored, so flip is dropped for digit datasets."""
        return cls(tuple(op for op in ALL_OPERATIONS if not (digit_like and op == "flip")))

    def sample(self, n: int, image_size: tuple[int, int], generator: torch.Generator) -> AugmentParams:
        """Draw one operation and its parameters for a batch of ``n`` (``n = 1``: shared by every image)."""
        op = self.strategy[int(torch.randint(len(self.strategy), (1,), generator=generator))]
        c, (h, w) = self.config, image_size

        def uniform(low: float, high: float) -> Tensor:
            return torch.rand(n, generator=generator) * (high - low) + low

        if op == "color":
            values = {
                "brightness": uniform(-0.5, 0.5) * c.brightness,
                "saturation": uniform(0, 1) * c.saturation,
                "contrast": uniform(0, 1) + c.contrast,
            }
        elif op == "crop":
            sx, sy = int(h * c.crop + 0.5), int(w * c.crop + 0.5)
            values = {
                "shift_x": torch.randint(-sx, sx + 1, (n,), generator=generator),
                "shift_y": torch.randint(-sy, sy + 1, (n,), generator=generator),
            }
        elif op == "cutout":
            size_x, size_y = int(h * c.cutout + 0.5), int(w * c.cutout + 0.5)
            values = {
                "centre_x": torch.randint(0, h + (1 - size_x % 2), (n,), generator=generator),
                "centre_y": torch.randint(0, w + (1 - size_y % 2), (n,), generator=generator),
            }
        elif op == "flip":
            values = {"flip": torch.rand(n, generator=generator) < c.flip}
        elif op == "scale":
            values = {"sx": uniform(1 / c.scale, c.scale), "sy": uniform(1 / c.scale, c.scale)}
        else:  # rotate
            values = {"angle": uniform(-1, 1) * c.rotate * math.pi / 180}
        return AugmentParams(op, values)

    def apply(self, x: Tensor, params: AugmentParams) -> Tensor:
        """Apply sampled parameters to a batch; batch-wide parameters (size 1) broadcast to every image."""
        # non_blocking: a plain copy from the host would wait for the device at every training step
        v = {k: t.to(x.device, non_blocking=True) for k, t in params.values.items()}
        n = x.shape[0]
        if all(t.shape[0] == 1 for t in v.values()):
            v = {k: t.expand(n) for k, t in v.items()}
        elif any(t.shape[0] != n for t in v.values()):
            raise ValueError(f"augmentation parameters drawn for another batch size than {n}")
        return getattr(self, f"_{params.operation}")(x, v)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment with fresh per-image parameters (the non-siamese use, e.g. evaluation training)."""
        return self.apply(x, self.sample(x.shape[0], (x.shape[2], x.shape[3]), generator))

    def augment_each(self, batches: list[Tensor], generators: list[torch.Generator]) -> list[Tensor]:
        """``[self(x, g) for x, g in zip(batches, generators)]``: each batch augmented with fresh parameters from
        its own generator, drawn in the same order. Batches that drew the same operation are transformed in one
        call — every operation acts on each image alone, so grouping changes only the number of calls."""
        drawn = [self.sample(x.shape[0], (x.shape[2], x.shape[3]), g) for x, g in zip(batches, generators)]
        out: list[Tensor] = list(batches)
        for operation in dict.fromkeys(params.operation for params in drawn):
            members = [i for i, params in enumerate(drawn) if params.operation == operation]
            joined = AugmentParams(operation, {key: torch.cat([drawn[i].values[key] for i in members])
                                               for key in drawn[members[0]].values})
            sizes = [batches[i].shape[0] for i in members]
            for i, part in zip(members, self.apply(torch.cat([batches[i] for i in members]), joined).split(sizes)):
                out[i] = part
        return out

    def apply_dense(self, x: Tensor, operation: Tensor, values: dict[str, Tensor]) -> Tensor:
        """The images of ``augment_each``'s batches, joined, each transformed by its batch's draw (``pack``'s rows),
        computed without a branch on the draw: every operation of the strategy runs on every image and each image
        keeps its own operation's output — the same values (every operation acts on each image alone), and one
        fixed sequence of kernels, whatever was drawn (so that a CUDA graph can hold it)."""
        out = x
        for index, name in enumerate(self.strategy):
            transformed = getattr(self, f"_{name}")(x, {key: values[key] for key in IDENTITY[name]})
            out = torch.where((operation == index).view(-1, 1, 1, 1), transformed, out)
        return out

    def pack(self, drawn: list[AugmentParams], sizes: list[int]) -> Tensor:
        """``drawn[i]`` (the draw for a batch of ``sizes[i]`` images) for the batches joined, as one float64 host
        tensor ``[1 + parameters, N]`` that one copy takes to the device: row 0 holds every image's operation (its
        index in the strategy), then a row per parameter of the strategy's operations — the image's batch's draw
        where the batch drew that operation, the identity elsewhere. Every value survives exactly (float32 values,
        small integers, bools)."""
        rows = self._packed_rows()
        row_of = {key: row for row, (key, _) in enumerate(rows, start=1)}
        identity = [0.0, *(float(value) for _, value in rows)]
        packed = torch.tensor(identity, dtype=torch.float64).unsqueeze(1).repeat(1, sum(sizes))
        start = 0
        for params, size in zip(drawn, sizes):
            packed[0, start : start + size] = self.strategy.index(params.operation)
            for key, value in params.values.items():
                packed[row_of[key], start : start + size] = value
            start += size
        return packed

    def apply_packed(self, x: Tensor, packed: Tensor) -> Tensor:
        """``apply_dense`` of ``pack``'s tensor (on ``x``'s device)."""
        dtype = {bool: torch.bool, int: torch.int64, float: torch.float32}
        values = {key: packed[row].to(dtype[type(value)])
                  for row, (key, value) in enumerate(self._packed_rows(), start=1)}
        return self.apply_dense(x, packed[0].long(), values)

    def _packed_rows(self) -> list[tuple[str, bool | int | float]]:
        """``pack``'s parameter rows after the operation row: (name, identity value), the strategy's in order."""
        return [(key, value) for name in self.strategy for key, value in IDENTITY[name].items()]

    def siamese(self, x: Tensor, generator: torch.Generator) -> AugmentParams:
        """Batch-wide parameters for a matching step: ``apply`` them to the real and the synthetic batch."""
        return self.sample(1, (x.shape[2], x.shape[3]), generator)

    # -- the operations ------------------------------------------------------------------------------------------

    @staticmethod
    def _color(x: Tensor, v: dict[str, Tensor]) -> Tensor:
        x = x + v["brightness"].view(-1, 1, 1, 1).to(x.dtype)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * v["saturation"].view(-1, 1, 1, 1).to(x.dtype) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * v["contrast"].view(-1, 1, 1, 1).to(x.dtype) + mean

    @staticmethod
    def _crop(x: Tensor, v: dict[str, Tensor]) -> Tensor:
        n, _, h, w = x.shape
        rows = torch.arange(h, device=x.device).view(1, h, 1) + v["shift_x"].view(n, 1, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w) + v["shift_y"].view(n, 1, 1)
        # Shift into a one-pixel zero border; any position that leaves the image reads the border (zero).
        rows = (rows + 1).clamp(0, h + 1).expand(n, h, w)
        cols = (cols + 1).clamp(0, w + 1).expand(n, h, w)
        padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
        batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
        return padded[batch, rows, cols].permute(0, 3, 1, 2)

    def _cutout(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        n, _, h, w = x.shape
        size_x, size_y = int(h * self.config.cutout + 0.5), int(w * self.config.cutout + 0.5)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        top = (v["centre_x"] - size_x // 2).view(n, 1, 1)
        left = (v["centre_y"] - size_y // 2).view(n, 1, 1)
        inside = (rows >= top) & (rows < top + size_x) & (cols >= left) & (cols < left + size_y)
        return x * (~inside).unsqueeze(1).to(x.dtype)

    @staticmethod
    def _flip(x: Tensor, v: dict[str, Tensor]) -> Tensor:
        return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    @staticmethod
    def _affine(x: Tensor, theta: Tensor) -> Tensor:
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)

    def _scale(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        zero = torch.zeros_like(v["sx"])
        theta = torch.stack([torch.stack([v["sx"], zero, zero], 1), torch.stack([zero, v["sy"], zero], 1)], 1)
        return self._affine(x, theta)

    def _rotate(self, x: Tensor, v: dict[str, Tensor]) -> Tensor:
        a = v["angle"]
        zero = torch.zeros_like(a)
        theta = torch.stack(
            [torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1
        )
        return self._affine(x, theta)
