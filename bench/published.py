"""Published numbers to compare against: ``results/published.json``, data with a source for every number.

``entries`` are test accuracies (%; ``std`` null where the source gave none) keyed by dataset, method, ipc
(null for ``full``, which ignores ipc), evaluation architecture and protocol; one entry per key is ``primary``,
the one a report shows. An entry with ``subgroups`` = G is of a set distilled as G independent subgroups and
merged (APM's parallelizability figure); it matches only a config with that many subgroups, and an entry
without the field only configs with one subgroup (or none named). ``eval_arch: convnet`` is the papers' ConvNet
for the dataset's image size: depth 3 on 28×28 and 32×32 data, depth 4 (ConvNetD4) on 64×64 data.
``efficiency`` holds published cost figures (peak GPU memory in GB, seconds per iteration, with the hardware as
the source states it); ``cost_notes`` the cost claims that are only prose.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PUBLISHED_PATH = Path(__file__).resolve().parents[1] / "results" / "published.json"


def arch_family(arch: str, dataset: str) -> str:
    """``convnet`` for the ConvNet the papers evaluate ``dataset`` on, else ``arch`` itself.

    ``convnet`` takes its depth from the image size (``bench.models.default_depth``): depth 3 on 28×28 and 32×32
    data, 4 on 64×64 data (``tiny_imagenet``, ``imagenet64``). So ``convnetd3`` is the papers' ConvNet on CIFAR-10
    and ``convnetd4`` on Tiny ImageNet, but a ``convnetd4`` evaluation on CIFAR-10 is another architecture."""
    match = re.fullmatch(r"convnetd(\d+)", arch)
    if match is None:
        return arch
    return "convnet" if int(match.group(1)) == papers_convnet_depth(dataset) else arch


def papers_convnet_depth(dataset: str) -> int | None:
    """The depth ``convnet`` has on ``dataset``'s native image size; None for a dataset this harness lacks."""
    from bench.data import DATASETS
    from bench.models import default_depth

    return default_depth(DATASETS.get(dataset).resolution) if dataset in DATASETS else None


def subgroups_match(entry: dict, subgroups: int | None) -> bool:
    """Whether a published entry is of a set distilled in ``subgroups`` independent subgroups (None: the config
    names none, which is one): an entry's ``subgroups`` must equal it, an entry without the field means one."""
    return (entry.get("subgroups") or 1) == (subgroups or 1)


@dataclass(frozen=True)
class Published:
    sources: dict[str, str] = field(default_factory=dict)  # source key → what the source is
    entries: list[dict] = field(default_factory=list)  # accuracies
    efficiency: list[dict] = field(default_factory=list)  # gpu_peak_gb, s_per_iter
    cost_notes: list[dict] = field(default_factory=list)  # {text, source}

    def accuracy(self, dataset: str, method: str, ipc: int | None, protocol: str, eval_arch: str,
                 subgroups: int | None = None) -> dict | None:
        """The primary published accuracy for this setting, or None. ``ipc`` is ignored for ``full``;
        ``subgroups`` is the config's (``subgroups_match``)."""
        for entry in self.entries:
            if (entry.get("primary") and entry["dataset"] == dataset and entry["method"] == method
                    and entry["protocol"] == protocol and entry["eval_arch"] == arch_family(eval_arch, dataset)
                    and (method == "full" or entry["ipc"] == ipc) and subgroups_match(entry, subgroups)):
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
