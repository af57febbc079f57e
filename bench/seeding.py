"""Seeds flow through ``torch.Generator``s; the global RNG is only ever borrowed, and given back as it was.

``generator_for(seed, "eval", "convnet")`` derives an independent stream for each purpose from one user seed,
so that, e.g., evaluation seed 0 and distillation seed 0 do not share random numbers. ``global_rng_seeded_from``
covers the draws no generator can be passed to (dropout, stochastic depth).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

import torch


def derive_seed(seed: int, *purpose: str) -> int:
    """A 63-bit seed from a user seed and a purpose path, stable across runs and machines."""
    text = "/".join([str(int(seed)), *purpose]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def generator_for(seed: int, *purpose: str) -> torch.Generator:
    """A CPU generator seeded from ``derive_seed(seed, *purpose)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *purpose))


@contextmanager
def global_rng_seeded_from(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    """Run the block with torch's global RNG (the CPU's, and ``device``'s if it is a GPU) seeded from
    ``generator``'s current state, and restore it afterwards.

    Dropout and stochastic depth draw from the global RNG, which torch seeds differently in every process; a
    network with them, trained inside this block, is the same for the same ``generator`` state. ``generator``
    is read, not consumed, so a network that draws nothing trains exactly as it would outside the block.
    """
    state = generator.get_state().numpy().tobytes()
    seed = int.from_bytes(hashlib.sha256(b"global-rng/" + state).digest()[:8], "little") >> 1
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield
