"""Published numbers to compare against: ``results/published.json``, data with a source for every number.

``entries`` are test accuracies (%; ``std`` null where the source gave none) keyed by dataset, method, ipc
(null for ``full``, which ignores ipc), evaluation architecture and protocol; one entry per key is ``primary``,
the one a report shows. ``efficiency`` holds published cost figures (peak GPU memory in GB, seconds per
iteration, with the hardware as the source states it); ``cost_notes`` the cost claims that are only prose.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PUBLISHED_PATH = Path(__file__).resolve().parents[1] / "results" / "published.json"


def arch_family(arch: str) -> str:
    """``convnet`` for the ConvNet of any depth (``convnetd3``, ``convnetd4``: the depth follows the image size)."""
    return "convnet" if re.fullmatch(r"convnet(d\d)?", arch) else arch


@dataclass(frozen=True)
class Published:
    sources: dict[str, str] = field(default_factory=dict)  # source key → what the source is
    entries: list[dict] = field(default_factory=list)  # accuracies
    efficiency: list[dict] = field(default_factory=list)  # gpu_peak_gb, s_per_iter
    cost_notes: list[dict] = field(default_factory=list)  # {text, source}

    def accuracy(self, dataset: str, method: str, ipc: int | None, protocol: str, eval_arch: str) -> dict | None:
        """The primary published accuracy for this setting, or None. ``ipc`` is ignored for ``full``."""
        for entry in self.entries:
            if (entry.get("primary") and entry["dataset"] == dataset and entry["method"] == method
                    and entry["protocol"] == protocol and entry["eval_arch"] == arch_family(eval_arch)
                    and (method == "full" or entry["ipc"] == ipc)):
                return entry
        return None

    def cost(self, dataset: str, method: str, ipc: int | None, segment: int | None) -> dict | None:
        """The published cost figure for this setting (APM's figures are per trajectory segment length), or None."""
        for entry in self.efficiency:
            if (entry["dataset"], entry["method"], entry["ipc"]) == (dataset, method, ipc) and (
                    entry.get("segment") is None or entry["segment"] == segment):
                return entry
        return None


def load_published(path: str | os.PathLike = PUBLISHED_PATH) -> Published:
    """Read the published numbers; an empty ``Published`` when the file is absent (e.g. a wheel install)."""
    path = Path(path)
    if not path.is_file():
        return Published()
    data = json.loads(path.read_text())
    return Published(data.get("sources", {}), data.get("entries", []), data.get("efficiency", []),
                     data.get("cost_notes", []))
