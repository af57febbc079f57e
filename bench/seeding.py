"""Seeds flow through ``torch.Generator``s; nothing here touches the global RNG.

``generator_for(seed, "eval", "convnet")`` derives an independent stream for each purpose from one user seed,
so that, e.g., evaluation seed 0 and distillation seed 0 do not share random numbers.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *purpose: str) -> int:
    """A 63-bit seed from a user seed and a purpose path, stable across runs and machines."""
    text = "/".join([str(int(seed)), *purpose]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator_for(seed: int, *purpose: str) -> torch.Generator:
    """A CPU generator seeded from ``derive_seed(seed, *purpose)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *purpose))
