"""A dataset too large for the GPU stays in host memory: the cell computes on the GPU and reads the data batch by
batch (``bench.data.dataset_storage``), so ImageNet-1K's ~63 GB are not inside every GPU peak. The training loop
then moves each step's batches to the networks, and computes exactly what it computes on a set held beside them."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import bench.data
import bench.evaluate as evaluate_module
from bench.augment import DSA
from bench.data import DATASET_ON_ENV, dataset_storage, load_dataset
from bench.errors import UserError
from bench.evaluate import evaluate_distilled, get_protocol, train_network, train_networks_batched
from bench.models import create_network
from bench.registry import create_method
from bench.runner import dataset_resident
from bench.seeding import generator_for
from methods.base import DistillContext

ARCH = "convnet[width=16]"
GiB = 2**30


def _networks(seeds=(0, 1, 2)):
    generators = [generator_for(seed, "evaluate", ARCH) for seed in seeds]
    return [create_network(ARCH, 10, 1, 8, g).double() for g in generators], generators


def _problem(hard: bool):
    data = torch.Generator().manual_seed(3)
    images = torch.randn(20, 1, 8, 8, generator=data, dtype=torch.float64)
    targets = torch.randint(10, (20,), generator=data) if hard else torch.randn(20, 10, generator=data, dtype=torch.float64)
    return images, targets


@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
@pytest.mark.parametrize("protocol_name", ["standard", "soft"])
def test_a_set_held_elsewhere_trains_as_one_held_beside_the_networks(monkeypatch, batched, protocol_name):
    """Steps of 8, 8 and 4 images with DSA over 3 epochs: with every step's batches gathered where the set lives
    and moved to the networks (forced here, since this machine has one device), each network ends with the
    parameters and the losses it gets from the set held beside it."""
    protocol = replace(get_protocol(protocol_name).resolve(quick=True), epochs=3, decay_epoch=2, batch_size=8)
    images, targets = _problem(protocol.targets == "hard")
    augment = DSA.for_dataset(digit_like=True)

    def train(staged: bool):
        monkeypatch.setattr(evaluate_module, "held_elsewhere", lambda images, device: staged)
        staged_calls = []
        real_staged_step = evaluate_module._staged_step
        monkeypatch.setattr(evaluate_module, "_staged_step",
                            lambda *args: staged_calls.append(1) or real_staged_step(*args))
        models, generators = _networks()
        if batched:
            losses = train_networks_batched(models, images, targets, protocol, generators, augment)
        else:
            losses = [train_network(m, images, targets, protocol, g, augment) for m, g in zip(models, generators)]
        return models, losses, len(staged_calls)

    direct, direct_losses, direct_calls = train(staged=False)
    staged, staged_losses, staged_calls = train(staged=True)
    assert direct_calls == 0 and staged_calls == 3 * 3 * (1 if batched else 3)  # epochs × steps (× networks)
    assert staged_losses == direct_losses
    for one, other in zip(direct, staged):
        for (name, a), b in zip(one.named_parameters(), other.parameters()):
            assert torch.equal(a, b), name


def test_the_staged_step_reindexes_each_networks_batch_into_the_moved_images():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    targets = torch.arange(10) * 10
    batches = [torch.tensor([7, 2, 5]), torch.tensor([0, 9, 1])]
    moved, moved_targets, local = evaluate_module._staged_step(images, targets, batches, torch.device("cpu"))
    assert len(moved) == 6 and [b.tolist() for b in local] == [[0, 1, 2], [3, 4, 5]]
    for batch, index in zip(batches, local):
        assert torch.equal(moved[index], images[batch]) and torch.equal(moved_targets[index], targets[batch])


def _fake_gpu(monkeypatch, total_memory: int) -> torch.device:
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total_memory))
    return torch.device("cuda", 0)


def test_a_gpu_cell_keeps_a_dataset_larger_than_a_quarter_of_the_gpu_on_the_host(monkeypatch):
    monkeypatch.delenv(DATASET_ON_ENV, raising=False)
    gpu = _fake_gpu(monkeypatch, 80 * GiB)
    imagenet64 = (1_281_167 + 50_000) * 3 * 64 * 64 * 4  # ~63 GB as float32
    cifar10 = 60_000 * 3 * 32 * 32 * 4
    assert dataset_storage(imagenet64, gpu) == torch.device("cpu")
    assert dataset_storage(cifar10, gpu) == gpu
    assert dataset_storage(20 * GiB, gpu) == gpu and dataset_storage(20 * GiB + 1, gpu) == torch.device("cpu")
    monkeypatch.setenv(DATASET_ON_ENV, "host")
    assert dataset_storage(cifar10, gpu) == torch.device("cpu")
    monkeypatch.setenv(DATASET_ON_ENV, "device")
    assert dataset_storage(imagenet64, gpu) == gpu
    # a CPU cell's data is where it computes, whatever the variable says
    for choice in ("auto", "host", "device"):
        monkeypatch.setenv(DATASET_ON_ENV, choice)
        assert dataset_storage(imagenet64, torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv(DATASET_ON_ENV, "gpu")
    with pytest.raises(UserError, match="DDBENCH_DATASET_ON='gpu': use one of auto, host, device"):
        dataset_storage(cifar10, torch.device("cpu"))


def test_a_dataset_held_apart_hands_its_users_images_on_their_device(monkeypatch):
    """Stored on the CPU, computing on the meta device (this machine's stand-in for a GPU): the class samples and
    the class's images that methods draw come on the compute device, drawn as from a dataset held there, and the
    cell's records name both devices."""
    monkeypatch.setattr(bench.data, "dataset_storage", lambda nbytes, device: torch.device("cpu"))
    held_apart = load_dataset("digits", device="meta")
    beside = load_dataset("digits")
    assert held_apart.storage_device.type == "cpu" and held_apart.device.type == "meta"
    assert held_apart.held_apart and not beside.held_apart
    assert dataset_resident(held_apart) | {"dataset_resident_mb": 0} == {
        "dataset_resident_mb": 0, "dataset_device": "cpu", "compute_device": "meta"}
    assert dataset_resident(beside)["dataset_device"] == dataset_resident(beside)["compute_device"] == "cpu"
    sample = held_apart.sample_class(3, 4, torch.Generator().manual_seed(1))
    assert sample.device.type == "meta" and sample.shape == (4, 1, 8, 8)
    assert torch.equal(beside.sample_class(3, 4, torch.Generator().manual_seed(1)),
                       held_apart.train_images[held_apart.class_indices(3)[torch.randperm(
                           len(held_apart.class_indices(3)), generator=torch.Generator().manual_seed(1))[:4]]])
    assert held_apart.images_of_class(5).device.type == "meta"
    assert len(held_apart.images_of_class(5)) == held_apart.class_counts()[5]


def test_the_full_set_held_on_the_host_is_trained_from_there(monkeypatch):
    """``full`` on a dataset held on the host: its set (the whole training split) stays there, the networks train
    on it batch by batch, one seed after another, and the engine says why."""
    monkeypatch.setattr(evaluate_module, "held_elsewhere", lambda images, device: True)
    digits = load_dataset("digits")
    ctx = DistillContext(digits, 1, "convnet", torch.Generator().manual_seed(0), torch.device("cpu"))
    distilled = create_method("full").distill(ctx)
    distilled.metadata.update(dataset="digits", transform=digits.transform)
    protocol = replace(get_protocol("standard").resolve(quick=True), epochs=1, decay_epoch=1)
    result = evaluate_distilled(distilled, digits, ARCH, protocol, [0, 1], "cpu", batch_seeds="on")
    assert result.eval_engine == {"path": "sequential", "reason": "a set held on the cpu, read batch by batch"}
    assert len(result.acc) == 2 and all(acc > 20 for acc in result.acc)  # one epoch of the whole split: far above chance (10 %)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_on_a_gpu_a_dataset_held_on_the_host_gives_the_numbers_of_one_held_on_the_gpu(monkeypatch):
    """DDBENCH_DATASET_ON=host against =device on digits: same expert, same evaluation, up to the GPU's rounding;
    the host-held dataset's images never sit on the GPU."""
    results = {}
    for choice in ("host", "device"):
        monkeypatch.setenv(DATASET_ON_ENV, choice)
        digits = load_dataset("digits", device="cuda:0")
        assert digits.device.type == "cuda" and digits.storage_device.type == ("cpu" if choice == "host" else "cuda")
        model = create_network(ARCH, 10, 1, 8, torch.Generator().manual_seed(0)).cuda()
        protocol = replace(get_protocol("standard").resolve(quick=True), epochs=2, decay_epoch=2)
        loss = train_network(model, digits.train_images, digits.train_labels, protocol, torch.Generator().manual_seed(1))
        accuracy = evaluate_module.accuracy(model, digits.test_images, digits.test_labels)
        results[choice] = (float(loss), accuracy)
    assert results["host"][0] == pytest.approx(results["device"][0], rel=1e-4)
    assert abs(results["host"][1] - results["device"][1]) <= 1.0
