"""The expert cache: content keys, reuse, resume, trajectories."""

import re

import pytest
import torch

from bench.data import load_dataset
from bench.experts import EXPERT_RECIPES, ExpertPool, expert_recipe


def pool(dataset, cache, recipe=None, count=2, arch="convnet[width=8]", device="cpu", log=None):
    return ExpertPool(dataset, arch, recipe or EXPERT_RECIPES["mtt"].quick(2), count, device, cache, log=log)


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
    logs = []
    trainer, waiter = pool(digits, tmp_path, count=1), pool(digits, tmp_path, count=1, log=logs.append)
    trainer.folder.mkdir(parents=True)
    with _exclusive_lock(trainer.folder / ".lock"):  # a separate open file: flock makes the thread wait on it
        thread = threading.Thread(target=waiter.ensure)
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not trainer.path(0).exists()  # blocked, not training its own copy
        trainer._train(0, after_epoch=lambda: None)
    thread.join(timeout=60)
    assert not thread.is_alive() and waiter.trained_now == 0
    waits = [line for line in logs if line.startswith("waiting for")]
    assert waits == [f"waiting for {trainer.folder / '.lock'}: another ddbench process is training these experts"]


def test_a_folder_where_the_pools_lock_file_goes_is_a_user_error_naming_it(tmp_path):
    from bench.errors import UserError

    digits = load_dataset("digits")
    broken = pool(digits, tmp_path, count=1)
    (broken.folder / ".lock").mkdir(parents=True)
    with pytest.raises(UserError, match=re.escape(f"lock file {broken.folder / '.lock'} (Is a directory)")):
        broken.ensure()
    assert not broken.path(0).exists()


def test_key_follows_how_the_experts_are_trained_but_their_random_streams_do_not(tmp_path, monkeypatch):
    """CPU threads, device (and GPU model) and torch version change the trained numbers in their last digits: each
    trains experts of its own (another key), from the same random streams (the same seed key)."""
    digits = load_dataset("digits")
    base = pool(digits, tmp_path)
    assert base.identity["trained_with"] == {"device": "cpu", "torch": str(torch.__version__),
                                             "cpu_threads": torch.get_num_threads()}
    variants = []
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: base.identity["trained_with"]["cpu_threads"] + 1)
        variants.append(pool(digits, tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__version__", "0.0.1")
        variants.append(pool(digits, tmp_path))
    with monkeypatch.context() as patch:  # no GPU needed: the pool only asks for the GPU's name
        for gpu in ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"):
            patch.setattr(torch.cuda, "get_device_name", lambda device=None, gpu=gpu: gpu)
            variants.append(pool(digits, tmp_path, device="cuda"))
    assert variants[-1].identity["trained_with"]["gpu"] == "NVIDIA A100-SXM4-80GB"
    assert "cpu_threads" not in variants[-1].identity["trained_with"]
    assert len({base.key, *(variant.key for variant in variants)}) == 1 + len(variants)
    assert {variant.seed_key for variant in variants} == {base.seed_key}
    assert pool(digits, tmp_path).key == base.key


def test_a_corrupted_expert_is_trained_again_to_the_same_bytes(tmp_path):
    """An expert file zeroed in the middle (same size) does not match its checksum: ``ensure`` says so and trains
    it again, to the same bytes (same thread count); its metadata says how it was made."""
    import json

    from safetensors import safe_open

    digits = load_dataset("digits")
    first = pool(digits, tmp_path)
    first.ensure()
    with safe_open(str(first.path(1)), "pt") as handle:
        made = json.loads(handle.metadata()["ddbench_expert"])
    assert made["expert"] == 1 and made["key"] == first.key and made["identity"]["trained_with"]["device"] == "cpu"
    original = first.path(1).read_bytes()
    middle = len(original) // 2
    first.path(1).write_bytes(original[:middle] + bytes(64) + original[middle + 64:])
    logs = []
    again = pool(digits, tmp_path, log=logs.append)
    again.ensure()
    assert again.trained_now == 1
    assert f"expert 1 in {again.folder} does not match its checksum: training it again" in logs
    assert not any(line.startswith("waiting for") for line in logs), "a free lock is taken without waiting"
    assert again.path(1).read_bytes() == original
    logs.clear()
    pool(digits, tmp_path, log=logs.append).ensure()
    assert len(logs) == 1 and "loaded from cache" in logs[0]


def test_an_expert_without_its_checksum_is_trained_again(tmp_path):
    """A file with no sidecar (a cache from before checksums, or a training killed between the two files) is not
    trusted."""
    digits = load_dataset("digits")
    first = pool(digits, tmp_path, count=1)
    first.ensure()
    first.checksum_path(0).unlink()
    logs = []
    again = pool(digits, tmp_path, count=1, log=logs.append)
    again.ensure()
    assert again.trained_now == 1 and again.checksum_path(0).is_file()
    assert any(line.startswith(f"expert 0 in {again.folder} has no checksum") and line.endswith("training it again")
               for line in logs)


def test_an_expert_file_with_the_wrong_tensors_is_one_line_naming_the_file(tmp_path):
    """A readable safetensors file whose tensors are not the architecture's (missing, extra, other shapes): a
    one-line ``UserError`` naming the file, not torch's multi-line ``load_state_dict`` error."""
    import pytest
    from safetensors.torch import save_file

    from bench.errors import UserError

    digits = load_dataset("digits")
    experts = pool(digits, tmp_path, count=1)
    experts.folder.mkdir(parents=True)
    final = {f"final/{name}": t for name, t in experts._blank_network().state_dict().items()}
    trajectory = {f"epoch{epoch:04d}/{name}": t.detach() for epoch in range(3)
                  for name, t in experts._blank_network().named_parameters()}
    wrong_files = {
        "1 missing, first final/classifier.weight": {**trajectory, **{k: v for k, v in final.items()
                                                                      if k != "final/classifier.weight"}},
        "1 unexpected, first final/surplus": {**trajectory, **final, "final/surplus": torch.zeros(1)},
        r"final/classifier.bias is \[3\], expected \[10\]": {**trajectory, **final,
                                                              "final/classifier.bias": torch.zeros(3)},
        "final/classifier.bias is torch.int32, expected floating point": {
            **trajectory, **final, "final/classifier.bias": torch.zeros(10, dtype=torch.int32)},
        "final/classifier.bias holds non-finite values": {
            **trajectory, **final, "final/classifier.bias": torch.full((10,), float("nan"))},
    }
    for problem, tensors in wrong_files.items():
        save_file(tensors, str(experts.path(0)))
        with pytest.raises(UserError, match=problem) as caught:
            experts.network(0)
        message = str(caught.value)
        assert str(experts.path(0)) in message and "\n" not in message, message
    save_file({**{k: v for k, v in trajectory.items() if not k.startswith("epoch0002/")}, **final}, str(experts.path(0)))
    with pytest.raises(UserError, match="missing, first epoch0002/") as caught:
        experts.trajectory(0)
    assert str(experts.path(0)) in str(caught.value) and "\n" not in str(caught.value)
    save_file({**trajectory, **final}, str(experts.path(0)))
    assert len(experts.trajectory(0)) == 3 and experts.network(0) is not None


def test_an_experts_file_in_the_cache_is_refused_before_any_work(tmp_path):
    import pytest

    from bench.errors import UserError
    from bench.experts import check_cache_dir

    check_cache_dir(tmp_path)
    (tmp_path / "experts").write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder") as caught:
        check_cache_dir(tmp_path)
    assert str(tmp_path / "experts") in str(caught.value) and "\n" not in str(caught.value)
