"""Choose APM's ipc-1 setting on a *validation* split, never on the test set.

The paper has no ipc-1 recipe, and its argparse default for the class term (``ce = 10``) differs from Table A9's
``ce = 0.1``. This script holds out a stratified fifth of the digits *training* set as validation, trains the
teachers on the remaining four fifths (in a private cache), distils APM at ipc 1 with each candidate ``ce``
(quick recipe, distillation seeds 0 and 1) and evaluates under the quick standard and soft protocols on the
held-out images (evaluation seeds 0, 1, 2). Random real images are the reference. The test split is not read.

    .venv/bin/python benchmarks/apm_ipc1_validation.py [--ce 0.1,1,10] [--set iterations=2500,lr_img=0.02]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile

import torch

from bench.data import Dataset, load_dataset
from bench.evaluate import evaluate_distilled, get_protocol
from bench.experts import soft_protocol_teacher
from bench.registry import create_method, default_recipe
from bench.runner import protocol_for
from bench.seeding import generator_for
from methods.base import DistillContext


def holdout_split(dataset: Dataset, fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The training set split in two, stratified: the kept part stays training data, the rest becomes `test`."""
    generator = generator_for(seed, "validation-split", dataset.name)
    keep, held = [], []
    for c in range(dataset.num_classes):
        ix = dataset.class_indices(c)[torch.randperm(len(dataset.class_indices(c)), generator=generator)]
        cut = int(round(len(ix) * fraction))
        held.append(ix[:cut])
        keep.append(ix[cut:])
    keep_ix, held_ix = torch.cat(keep), torch.cat(held)
    return Dataset(dataset.info, dataset.train_images[keep_ix], dataset.train_labels[keep_ix],
                   dataset.train_images[held_ix], dataset.train_labels[held_ix], dataset.class_names,
                   dict(dataset.transform, validation_holdout=fraction), dataset.zca)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--ce", default="0.1,1,10")
    parser.add_argument("--distill-seeds", default="0,1")
    parser.add_argument("--set", default="", help="further APM overrides, e.g. iterations=2500,lr_img=0.02")
    parser.add_argument("--random", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    data = holdout_split(load_dataset(args.dataset))
    print(f"{args.dataset}: {len(data.train_labels)} training images, {len(data.test_labels)} held out for validation")
    cache = tempfile.mkdtemp(prefix="ddbench-validation-")  # the held-out split's own experts, removed at exit
    atexit.register(shutil.rmtree, cache, True)
    seeds = [0, 1, 2]
    teacher = soft_protocol_teacher(data, "convnet", quick=True, device="cpu", cache_dir=cache)
    candidates = [("random", {})] if args.random else []
    extra = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in args.set.split(",") if kv)}
    candidates += [(f"apm ce={ce}", {"ce": float(ce), **extra}) for ce in args.ce.split(",")]
    print(f"{'candidate':<14} {'protocol':<9} {'distill seed':>12} {'val acc (mean ± std over 3)':>28}")
    for label, overrides in candidates:
        spec = "random" if label == "random" else f"apm.{default_recipe('apm', data.name, 1)}"
        method = create_method(spec, quick=True, **overrides)
        for distill_seed in [int(s) for s in args.distill_seeds.split(",")]:
            ctx = DistillContext(data, 1, "convnet", generator_for(distill_seed, "distill", data.name, "1"),
                                 torch.device("cpu"), quick=True, cache_dir=cache)
            distilled = method.distill(ctx)
            for name in ("standard", "soft"):
                protocol = protocol_for(get_protocol(name), distilled, quick=True)
                result = evaluate_distilled(distilled, data, "convnet", protocol, seeds, "cpu",
                                            teacher=teacher if name == "soft" else None)
                accs = result.acc  # percent
                print(f"{label:<14} {name:<9} {distill_seed:>12} {statistics.mean(accs):>20.1f} ± {statistics.stdev(accs):.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
