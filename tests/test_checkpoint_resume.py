"""Resumable distillations: a checkpoint every N iterations; a crashed or killed APM run resumed from it ends
with the same images as an uninterrupted run (CPU, same seed); a torn checkpoint is ignored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bench.checkpoint import MARKER, Checkpointer
from bench.registry import create_method, get_method_class
from bench.runner import RunRequest, distill_cell, plan
from methods.base import DistillContext

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"iterations": 12, "student_epochs": 3, "checkpoints": 2, "num_experts": 2, "expert_epochs": 1}
CPU = torch.device("cpu")


def request(folder: Path, every: int | None = None) -> RunRequest:
    return RunRequest("digits", ["apm"], [1], [], [], folder / "results", quick=True, cache_dir=str(folder / "cache"),
                      method_options={"apm": OPTIONS}, isolate=False, checkpoint_every=every)


def crash_after(monkeypatch, iteration: int) -> None:
    """Make the report hook raise once ``iteration`` has been reported, as a crash would."""
    original = DistillContext.report

    def report(self, it, **losses):
        original(self, it, **losses)
        if it == iteration:
            raise RuntimeError(f"simulated crash after iteration {it}")

    monkeypatch.setattr(DistillContext, "report", report)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(folder with the expert cache, the planned cell, the images of an uninterrupted run without checkpoints)."""
    folder = tmp_path_factory.mktemp("resume")
    cell = plan(request(folder))[0]
    images = distill_cell(cell, request(folder), CPU, {}).images
    return folder, cell, images


def checkpoint_folder(folder: Path) -> Path:
    (found,) = (folder / "results" / "checkpoints").iterdir()
    return found


def test_checkpointer_round_trip(tmp_path):
    param = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=0.1)  # int-keyed state and a 0-dim `step` tensor
    param.grad = torch.ones(3)
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    store = Checkpointer(tmp_path / "ck", every=4, identity={"seed": 0})
    assert store.load() is None and not store.due(3) and store.due(4)
    store.save(4, {"x": param, "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "t": (1, 0.1)})
    store.save(8, {"x": param, "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "t": (1, 0.1)})
    assert sorted(p.name for p in store.folder.iterdir()) == [MARKER, "state-00000008.safetensors"]
    assert not store.due(11) and store.due(12)

    iteration, state = Checkpointer(tmp_path / "ck", every=4, identity={"seed": 0}).load()
    assert iteration == 8 and state["t"] == [1, 0.1]
    assert torch.equal(state["x"], param.detach()) and torch.equal(state["generator"], generator.get_state())
    restored = torch.optim.Adam([torch.zeros(3, requires_grad=True)], lr=0.1)
    restored.load_state_dict(state["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    store.clear()
    assert not store.folder.exists()


def corrupt_truncated(folder: Path) -> None:
    (tensors,) = folder.glob("*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-7])


def corrupt_missing(folder: Path) -> None:
    (tensors,) = folder.glob("*.safetensors")
    tensors.unlink()


def corrupt_json(folder: Path) -> None:
    marker = folder / MARKER
    marker.write_text(marker.read_text()[:40])


def corrupt_identity(folder: Path) -> None:
    marker = folder / MARKER
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), identity={"seed": 1})))


def corrupt_iteration(folder: Path) -> None:
    """A hand edit: the checksum of the tensor file still holds, but the run would resume past its end."""
    marker = folder / MARKER
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), iteration=10**12)))


def corrupt_state_value(folder: Path) -> None:
    marker = folder / MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(meta, state=dict(meta["state"], step="three"))))


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_missing, corrupt_json, corrupt_identity,
                                     corrupt_iteration, corrupt_state_value])
def test_a_torn_or_foreign_checkpoint_is_ignored_with_a_log_line(tmp_path, corrupt):
    logged = []
    store = Checkpointer(tmp_path, every=1, identity={"seed": 0}, log=logged.append)
    store.save(3, {"x": torch.arange(10.0), "step": 3})
    corrupt(tmp_path)
    assert store.load() is None
    assert len(logged) == 1 and "ignoring the checkpoint" in logged[0] and "starting from scratch" in logged[0]


def test_bad_interval_is_a_user_error(tmp_path):
    from bench.errors import UserError

    with pytest.raises(UserError, match="checkpoint_every"):
        Checkpointer(tmp_path, every=0)


@pytest.mark.parametrize("crash, resume", [(7, 6), (4, 3)])  # from 3: before the images' lr decay (after 6)
def test_apm_resumes_after_a_crash_with_identical_images(uninterrupted, monkeypatch, capsys, crash, resume):
    folder, cell, reference = uninterrupted
    run = request(folder, every=3)
    crash_after(monkeypatch, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_cell(cell, run, CPU, {})
    saved = checkpoint_folder(folder)
    assert json.loads((saved / MARKER).read_text())["iteration"] == resume  # period boundaries (mid_gap 2)
    monkeypatch.undo()
    capsys.readouterr()

    resumed = distill_cell(cell, run, CPU, {})
    assert f"resuming from the checkpoint after iteration {resume}" in capsys.readouterr().err
    assert resumed.metadata["resumed_from"] == resume
    assert torch.equal(resumed.images, reference)
    assert not saved.exists()  # deleted once the distillation returned


def test_apm_resumes_after_a_torn_checkpoint_from_scratch(uninterrupted, monkeypatch, capsys):
    folder, cell, reference = uninterrupted
    run = request(folder, every=3)
    crash_after(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill_cell(cell, run, CPU, {})
    monkeypatch.undo()
    corrupt_truncated(checkpoint_folder(folder))
    capsys.readouterr()

    again = distill_cell(cell, run, CPU, {})
    assert "ignoring the checkpoint" in capsys.readouterr().err
    assert "resumed_from" not in again.metadata
    assert torch.equal(again.images, reference)


def test_apm_subgroups_resume_in_the_second_group(uninterrupted, monkeypatch, tmp_path):
    folder, cell, _ = uninterrupted
    options = dict(OPTIONS, iterations=6, subgroups=2)

    def distil(checkpoints=None):
        ctx = DistillContext(cell.dataset, 2, "convnet", torch.Generator().manual_seed(0), CPU, quick=True,
                             cache_dir=str(folder / "cache"), checkpoints=checkpoints)
        return create_method("apm", quick=True, **options).distill(ctx), ctx

    reference, _ = distil()
    crash_after(monkeypatch, 10)  # group 2's iterations are 6 … 11; its boundary after 9 is checkpointed
    with pytest.raises(RuntimeError):
        distil(Checkpointer(tmp_path / "ck", every=4))
    monkeypatch.undo()
    resumed, ctx = distil(Checkpointer(tmp_path / "ck", every=4))
    assert ctx.resumed_from == 9
    assert torch.equal(resumed.images, reference.images) and torch.equal(resumed.labels, reference.labels)


KILLED_RUN = """
import sys, time, torch
from pathlib import Path
from safetensors.torch import save_file
from bench.runner import RunRequest, distill_cell, plan
from methods.base import DistillContext

folder, out, slow = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "slow"
if slow:  # slow the loop down so that the parent can kill it mid-way (the arithmetic is untouched)
    report = DistillContext.report
    DistillContext.report = lambda self, it, **losses: (report(self, it, **losses), time.sleep(0.2))[0]
run = RunRequest("digits", ["apm"], [1], [], [], folder / "results", quick=True, cache_dir=str(folder / "cache"),
                 method_options={"apm": %r}, isolate=False, checkpoint_every=3)
distilled = distill_cell(plan(run)[0], run, torch.device("cpu"), {})
save_file({"images": distilled.images.contiguous()}, out, metadata={"resumed_from": str(distilled.metadata.get("resumed_from"))})
""" % OPTIONS


@pytest.mark.slow
def test_apm_killed_mid_way_resumes_with_identical_images(uninterrupted, tmp_path):
    folder, _, reference = uninterrupted
    out = tmp_path / "images.safetensors"
    command = [sys.executable, "-c", KILLED_RUN, str(folder), str(out)]
    child = subprocess.Popen([*command, "slow"], cwd=ROOT, stderr=subprocess.DEVNULL)
    marker = folder / "results" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(marker.glob(f"*/{MARKER}")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the distillation ended before it could be killed"
    assert not out.exists()

    subprocess.run([*command, "fast"], cwd=ROOT, check=True, stderr=subprocess.DEVNULL, timeout=300)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["resumed_from"] in {"3", "6", "9"}
    assert torch.equal(load_file(str(out))["images"], reference)


@pytest.mark.parametrize("name", ["mtt", "tesla"])
def test_mtt_and_tesla_resume_after_a_crash_with_identical_results(uninterrupted, monkeypatch, tmp_path, name):
    folder, cell, _ = uninterrupted
    options = dict(get_method_class(name).smoke, iterations=4)

    def distil(checkpoints=None):
        ctx = DistillContext(cell.dataset, 2, "convnet[width=16]", torch.Generator().manual_seed(0), CPU,
                             quick=True, cache_dir=str(folder / "cache"), checkpoints=checkpoints)
        return create_method(name, quick=True, **options).distill(ctx), ctx

    reference, _ = distil()
    crash_after(monkeypatch, 3)  # reported before iteration 3's update: the checkpoint after 2 is the last
    with pytest.raises(RuntimeError):
        distil(Checkpointer(tmp_path / "ck", every=2))
    monkeypatch.undo()
    resumed, ctx = distil(Checkpointer(tmp_path / "ck", every=2))
    assert ctx.resumed_from == 2
    assert torch.equal(resumed.images, reference.images)
    assert resumed.learned_lr == reference.learned_lr
    assert (resumed.soft_labels is None) == (name == "mtt")
    if name == "tesla":
        assert torch.equal(resumed.soft_labels, reference.soft_labels)
