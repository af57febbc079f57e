"""The expert cache: content keys, reuse, resume, trajectories."""

import torch

from bench.data import load_dataset
from bench.experts import EXPERT_RECIPES, ExpertPool, expert_recipe


def pool(dataset, cache, recipe=None, count=2, arch="convnet[width=8]"):
    return ExpertPool(dataset, arch, recipe or EXPERT_RECIPES["mtt"].quick(2), count, "cpu", cache)


def test_equal_recipe_hits_changed_recipe_misses(tmp_path):
    digits = load_dataset("digits")
    first = pool(digits, tmp_path)
    first.ensure()
    assert first.trained_now == 2
    again = pool(digits, tmp_path)
    again.ensure()
    assert again.trained_now == 0 and again.key == first.key
    assert pool(digits, tmp_path, EXPERT_RECIPES["mtt"].quick(3)).key != first.key
    assert pool(digits, tmp_path, arch="convnet[width=16]").key != first.key
    assert pool(load_dataset("digits", zca=True), tmp_path).key != first.key
    for index in range(2):
        assert torch.equal(first.network(index).classifier.weight, again.network(index).classifier.weight)


def test_another_copy_of_the_dataset_trains_its_own_experts(tmp_path):
    """The key holds the data files' fingerprint: a copy with other labels or pixels but the same name, transform
    and size must not load the first copy's experts."""
    from dataclasses import replace

    from bench.data import RawSplits

    digits = load_dataset("digits")
    raw = RawSplits(digits.train_images, digits.train_labels, digits.test_images, digits.test_labels, digits.class_names)
    relabelled = RawSplits(raw.train_images, raw.train_labels.roll(1), raw.test_images, raw.test_labels, raw.class_names)
    inverted = RawSplits(1 - raw.train_images, raw.train_labels, raw.test_images, raw.test_labels, raw.class_names)
    fingerprints = {raw.fingerprint(), relabelled.fingerprint(), inverted.fingerprint()}
    assert len(fingerprints) == 3 and raw.fingerprint() == raw.fingerprint()
    assert digits.fingerprint is not None and load_dataset("digits").fingerprint == digits.fingerprint
    other_copy, this_copy = pool(replace(digits, fingerprint=relabelled.fingerprint()), tmp_path), pool(digits, tmp_path)
    assert other_copy.key != this_copy.key
    assert other_copy.seed_key == this_copy.seed_key  # the same setting draws the same networks on either copy


def test_interrupted_pool_resumes_at_the_missing_expert(tmp_path):
    digits = load_dataset("digits")
    full = pool(digits, tmp_path, count=3)
    full.ensure()
    before = full.network(2).classifier.weight.clone()
    full.path(1).unlink()
    resumed = pool(digits, tmp_path, count=3)
    resumed.ensure()
    assert resumed.trained_now == 1
    assert torch.equal(resumed.network(2).classifier.weight, before)


def test_training_shows_a_bar_over_the_missing_experts_epochs(tmp_path, monkeypatch):
    """The bar counts only what is trained: after an interruption, the missing expert's epochs."""
    import bench.experts

    bars = []

    class Bar:
        def __init__(self, desc, total):
            self.total, self.done, self.postfixes = total, 0, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            pass

        def update(self, n):
            self.done += n

        def set_postfix_str(self, text):
            self.postfixes.append(text)

    monkeypatch.setattr(bench.experts, "progress_bar", Bar)
    digits = load_dataset("digits")
    pool(digits, tmp_path, count=3).ensure()
    assert [(b.total, b.done, b.postfixes) for b in bars] == [(6, 6, ["expert 1 of 3", "expert 2 of 3", "expert 3 of 3"])]
    pool(digits, tmp_path, count=3).path(1).unlink()
    pool(digits, tmp_path, count=3).ensure()
    assert (bars[-1].total, bars[-1].done, bars[-1].postfixes) == (2, 2, ["expert 2 of 3"])
    pool(digits, tmp_path, count=3).ensure()
    assert len(bars) == 2, "a pool loaded from the cache shows no bar"


def test_trajectory_runs_from_init_to_final(tmp_path):
    digits = load_dataset("digits")
    p = pool(digits, tmp_path, count=1)
    trajectory = p.trajectory(0)
    assert len(trajectory) == 3  # epochs 0, 1, 2
    final = dict(p.network(0).named_parameters())
    assert all(torch.equal(trajectory[-1][name], final[name].detach()) for name in final)
    assert not torch.equal(trajectory[0]["classifier.weight"], trajectory[-1]["classifier.weight"])


def test_quick_recipes_are_shorter_copies():
    full, quick = EXPERT_RECIPES["apm"], expert_recipe("apm", quick=True)
    assert quick.epochs < full.epochs and quick.lr == full.lr and quick.momentum == full.momentum
    assert quick.decay_epoch == quick.epochs // 2


def test_a_second_process_waits_for_the_lock_then_loads(tmp_path):
    """While one holder of the pool's lock trains the experts, another ``ensure`` waits, then trains nothing."""
    import threading

    from bench.experts import _exclusive_lock

    digits = load_dataset("digits")
    trainer, waiter = pool(digits, tmp_path, count=1), pool(digits, tmp_path, count=1)
    trainer.folder.mkdir(parents=True)
    with _exclusive_lock(trainer.folder / ".lock"):  # a separate open file: flock makes the thread wait on it
        thread = threading.Thread(target=waiter.ensure)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not trainer.path(0).exists()  # blocked, not training its own copy
        trainer._train(0, after_epoch=lambda: None)
    thread.join(timeout=60)
    assert not thread.is_alive() and waiter.trained_now == 0
