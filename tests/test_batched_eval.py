"""Seed-batched evaluation (issue 9): every seed of an evaluation trained at once, as one stacked model, computing
what the sequential loop computes; the path chosen (auto / on / off) is recorded, and auto's choice is cached."""

import copy
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch

import bench.evaluate as evaluate_module
from bench.augment import DSA
from bench.cli import build_parser
from bench.data import load_dataset
from bench.errors import UserError
from bench.evaluate import (_stacked_losses, accuracy, calibration_key, engine_cache_path, evaluate_distilled, get_protocol,
                            read_engine_cache, stacked_accuracies, train_network, train_networks_batched)
from bench.models import create_network
from bench.registry import create_method
from bench.runner import Cell, RunRequest, _identity, measured_evaluation
from bench.seed_stack import (BATCHNORM_REASON, GROUPED_FORWARD, RANDOMNESS_REASON, VMAP_FORWARD, HalvingAveragePool,
                              SeedStack, batching_unsupported_reason)
from bench.seeding import generator_for
from bench.suite import load_suite, suite_requests
from methods.base import DistillContext

ARCH = "convnet[width=16]"  # depth 1 at 8×8: a fast ConvNet
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def small_set(digits):
    ctx = DistillContext(digits, 2, "convnet", torch.Generator().manual_seed(0), torch.device("cpu"))
    distilled = create_method("random").distill(ctx)
    distilled.metadata.update(dataset="digits", transform=digits.transform)
    return distilled


def short(name="standard", epochs=3, **kw):
    return replace(get_protocol(name).resolve(quick=True), epochs=epochs, decay_epoch=epochs // 2 + 1, **kw)


def fresh_networks(arch=ARCH, seeds=SEEDS, in_chans=1, size=8):
    """Each seed's network and generator, as ``evaluate_distilled`` makes them (the generator that drew the
    weights goes on to draw the batches and the augmentation), in float64."""
    generators = [generator_for(seed, "evaluate", arch) for seed in seeds]
    models = [create_network(arch, 10, in_chans, size, g).double() for g in generators]
    return models, generators


@torch.no_grad()
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-300)) if a.numel() else 0.0


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-convolutions", "vmap"])
@pytest.mark.parametrize("protocol_name, loss", [("standard", "ce"), ("soft", "l1"), ("soft", "kl")])
def test_batched_training_gives_each_seed_its_sequential_parameters(protocol_name, loss, grouped):
    """float64, DSA on, lr decay inside the run (epoch 2 of 3), several steps per epoch, a last batch smaller
    than the others: after training, every seed's parameters are the ones it gets trained alone."""
    # 20 images: steps of 8, 8, 4; a learned lr (MTT-style) as the resolved protocol hands it over
    protocol = short(protocol_name, epochs=3, batch_size=8, loss=loss, temperature=2.0, lr=0.037)
    assert protocol.dsa and protocol.decay_epoch == 2
    data = torch.Generator().manual_seed(7)
    images = torch.randn(20, 1, 8, 8, generator=data, dtype=torch.float64)
    targets = torch.randint(10, (20,), generator=data) if protocol.targets == "hard" else \
        torch.randn(20, 10, generator=data, dtype=torch.float64)
    augment = DSA.for_dataset(digit_like=True)

    alone, alone_generators = fresh_networks()
    alone_losses = [train_network(m, images, targets, protocol, g, augment) for m, g in zip(alone, alone_generators)]
    stacked, stacked_generators = fresh_networks()
    epochs_seen = []
    stacked_losses = train_networks_batched(stacked, images, targets, protocol, stacked_generators, augment,
                                            on_epoch=lambda epoch, loss: epochs_seen.append(epoch), grouped=grouped)

    assert SeedStack(stacked, grouped).forward_kind == (GROUPED_FORWARD if grouped else VMAP_FORWARD)
    for one, other in zip(alone, stacked):
        for (name, a), b in zip(one.named_parameters(), other.parameters()):
            assert relative_error(a, b) < 1e-6, name
    assert stacked_losses == pytest.approx(alone_losses, rel=1e-9)
    assert epochs_seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # every network reports every epoch
    # the seeds did differ: different initialisations, batches and augmentations
    assert relative_error(alone[0].classifier.weight, alone[1].classifier.weight) > 0.1
    # every generator was consumed exactly as in the sequential loop
    assert [g.get_state().tolist() for g in stacked_generators] == [g.get_state().tolist() for g in alone_generators]

    test_images = torch.randn(50, 1, 8, 8, generator=data, dtype=torch.float64)
    test_labels = torch.randint(10, (50,), generator=data)
    assert stacked_accuracies(SeedStack(alone, grouped), test_images, test_labels, batch_size=16) == \
        [accuracy(m, test_images, test_labels) for m in alone]


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 3, 7, 7), (2, 2, 7, 6), (1, 1, 3, 5)])
def test_halving_average_pool_has_avg_pool2d_values_and_gradient(shape):
    """The pool the grouped forward uses on CUDA, on CPU in float64: odd sides too (the pool drops the last row)."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
    pooled = torch.nn.functional.avg_pool2d(x, 2, 2)
    upstream = torch.randn(pooled.shape, dtype=torch.float64, generator=generator)
    expected, = torch.autograd.grad(pooled, x, upstream)
    ours = HalvingAveragePool.apply(x)
    got, = torch.autograd.grad(ours, x, upstream)
    assert torch.equal(ours, pooled)
    assert torch.allclose(got, expected, rtol=0, atol=1e-15)
    if shape[2] % 2:
        assert not got[:, :, -1].any()  # the dropped row gets no gradient


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_the_stacked_forward_on_cuda_gives_each_seed_its_own_gradient():
    """On CUDA the grouped forward pools with ``HalvingAveragePool``; in float64 every seed's stacked gradient is
    the gradient its network gets alone."""
    device = torch.device("cuda:0")
    models, _ = fresh_networks("convnet[width=16,depth=2]", size=14)  # 14 → 7 → 3: an odd side is pooled
    models = [m.to(device) for m in models]
    data = torch.Generator().manual_seed(3)
    inputs = torch.randn(len(models), 6, 1, 14, 14, dtype=torch.float64, generator=data).to(device)
    targets = torch.randint(10, (len(models), 6), generator=data).to(device)
    stack = SeedStack(models).train()
    losses = stack.losses(partial(_stacked_losses, short()), inputs, targets)
    stacked_grads = torch.autograd.grad(losses.sum(), stack.parameters)
    for s, model in enumerate(models):
        alone = torch.nn.functional.cross_entropy(model(inputs[s]), targets[s])
        for (name, _), stacked, grad in zip(model.named_parameters(), stacked_grads,
                                            torch.autograd.grad(alone, list(model.parameters()))):
            # a conv bias before a norm has a zero gradient: rounding noise of 1e-17, compared absolutely
            assert torch.allclose(stacked[s], grad, rtol=1e-6, atol=1e-12), name


def test_a_network_that_is_not_a_plain_chain_is_stacked_with_vmap():
    arch = "resnet18_cifar[widths=[4,4,4,4],layers=[1,1,1,1]]"
    protocol = short(epochs=2, batch_size=8)
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    targets = torch.arange(12) % 10
    alone, alone_generators = fresh_networks(arch, seeds=[0, 1])
    for model, generator in zip(alone, alone_generators):
        train_network(model, images, targets, protocol, generator, DSA.for_dataset(True))
    stacked, stacked_generators = fresh_networks(arch, seeds=[0, 1])
    assert SeedStack(stacked).forward_kind == VMAP_FORWARD
    train_networks_batched(stacked, images, targets, protocol, stacked_generators, DSA.for_dataset(True))
    for one, other in zip(alone, stacked):
        for a, b in zip(one.parameters(), other.parameters()):
            assert relative_error(a, b) < 1e-6


@pytest.mark.parametrize("batch_seeds", ["on", "off"])
def test_the_same_seeds_give_identical_results_on_either_path(digits, small_set, batch_seeds, tmp_path):
    runs = [evaluate_distilled(small_set, digits, ARCH, short(epochs=4), SEEDS, "cpu", batch_seeds=batch_seeds,
                               cache_dir=tmp_path) for _ in range(2)]
    assert runs[0].acc == runs[1].acc and runs[0].final_train_loss == runs[1].final_train_loss
    assert runs[0].eval_engine["path"] == {"on": "batched", "off": "sequential"}[batch_seeds]
    assert runs[0].eval_engine["reason"] == batch_seeds
    assert len(set(runs[0].final_train_loss)) == len(SEEDS)  # the seeds differ


def test_both_paths_agree_in_float32(digits, small_set, tmp_path):
    batched, sequential = (evaluate_distilled(small_set, digits, ARCH, short(epochs=4), SEEDS, "cpu", batch_seeds=mode,
                                              cache_dir=tmp_path) for mode in ("on", "off"))
    assert batched.final_train_loss == pytest.approx(sequential.final_train_loss, rel=1e-4)
    one_image = 100 / digits.test_labels.shape[0]  # rounding may tip an argmax near a tie, rarely
    assert batched.acc == pytest.approx(sequential.acc, abs=one_image + 1e-9)


def test_batched_and_sequential_records_count_the_same_flops_and_identity(digits, small_set):
    protocol = get_protocol("standard")
    fields = {mode: measured_evaluation(small_set, digits, ARCH, protocol, short(epochs=3), SEEDS,
                                        torch.device("cpu"), {}, None, mode) for mode in ("on", "off")}
    assert fields["on"]["eval_engine"]["path"] == "batched" and fields["off"]["eval_engine"]["path"] == "sequential"
    assert fields["on"]["flops_per_eval_epoch"] == fields["off"]["flops_per_eval_epoch"] > 0
    assert fields["on"]["protocol_config"] == fields["off"]["protocol_config"]
    request = RunRequest(dataset="digits", methods=["random"], ipcs=[2], eval_archs=[ARCH], seeds=SEEDS,
                         results_dir=Path("unused"))
    cell = Cell("random", create_method("random"), 2, digits)
    ids = {mode: _identity(cell, replace(request, batch_seeds=mode), ARCH, protocol) for mode in ("auto", "on", "off")}
    assert ids["auto"] == ids["on"] == ids["off"]


def test_an_architecture_that_cannot_be_stacked_falls_back_and_says_why(digits, small_set):
    arch = "convnet_bn[width=8]"  # BatchNorm keeps running statistics
    logged = []
    fields = [measured_evaluation(small_set, digits, arch, get_protocol("standard"), short(epochs=2), [0, 1],
                                  torch.device("cpu"), {}, None, "on") for _ in range(2)]
    result = evaluate_distilled(small_set, digits, arch, short(epochs=2), [0, 1], "cpu", batch_seeds="on",
                                log=logged.append)
    for engine in [f["eval_engine"] for f in fields] + [result.eval_engine]:
        assert engine == {"path": "sequential", "reason": BATCHNORM_REASON}
    assert logged == []  # logged once per process, by the first evaluation above
    other = evaluate_distilled(small_set, digits, "convnet_bn[width=4]", short(epochs=1), [0, 1], "cpu",
                               batch_seeds="auto", log=logged.append)
    assert other.eval_engine["path"] == "sequential" and len(logged) == 1 and BATCHNORM_REASON in logged[0]


def test_a_forward_that_draws_random_numbers_is_not_stacked():
    arch = "vit_tiny_patch16_224[patch_size=4,depth=1,embed_dim=24,num_heads=2,drop_rate=0.1]"
    models = [create_network(arch, 10, 1, 8, torch.Generator().manual_seed(s)) for s in range(2)]
    loss = partial(_stacked_losses, get_protocol("standard"))
    example, target = torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])
    assert batching_unsupported_reason(models, example, loss, target) == RANDOMNESS_REASON
    without_dropout = [create_network(arch.replace("drop_rate=0.1", "drop_rate=0.0"), 10, 1, 8,
                                      torch.Generator().manual_seed(s)) for s in range(2)]
    assert batching_unsupported_reason(without_dropout, example, loss, target) is None


def test_auto_calibrates_once_then_reuses_the_cached_choice(digits, small_set, tmp_path, monkeypatch):
    protocol = short(epochs=evaluate_module.MIN_STEPS_TO_CALIBRATE)  # 20 images, one step per epoch
    first = evaluate_distilled(small_set, digits, ARCH, protocol, SEEDS, "cpu", batch_seeds="auto", cache_dir=tmp_path)
    assert first.eval_engine["reason"].startswith("auto: calibrated batched ")
    key = calibration_key(torch.device("cpu"), ARCH, (1, 8, 8), 20, len(SEEDS), protocol.batch_size)
    cached = read_engine_cache(tmp_path)
    assert list(cached) == [key] and cached[key]["path"] == first.eval_engine["path"]
    assert json.loads(engine_cache_path(tmp_path).read_text())["choices"] == cached
    assert "cuda_graphs" not in first.eval_engine  # graphs are a CUDA matter, and the entry says why none ran
    assert cached[key]["cuda_graphs"] is False and cached[key]["no_graphs_reason"] == "not a CUDA device"

    def no_calibration(*args, **kwargs):
        raise AssertionError("a cached choice must not be calibrated again")

    monkeypatch.setattr(evaluate_module, "calibrate_seed_batching", no_calibration)
    second = evaluate_distilled(small_set, digits, ARCH, protocol, SEEDS, "cpu", batch_seeds="auto", cache_dir=tmp_path)
    assert second.eval_engine["path"] == first.eval_engine["path"]
    assert second.eval_engine["reason"].startswith("auto: cached calibration")
    assert second.acc == first.acc and second.final_train_loss == first.final_train_loss
    for path in ("batched", "sequential"):  # the cached entry decides, whatever it says
        entry = {"path": path, "ratio": 1.0}
        engine_cache_path(tmp_path).write_text(json.dumps({"version": evaluate_module.ENGINE_CACHE_VERSION,
                                                           "choices": {key: entry}}))
        chosen = evaluate_distilled(small_set, digits, ARCH, protocol, SEEDS, "cpu", cache_dir=tmp_path)
        assert chosen.eval_engine["path"] == path


def test_calibration_meets_every_augmentation_operation_before_it_times_a_step(monkeypatch):
    """A sequential step draws one DSA operation: the first use of the others must not land in a timed step."""
    models, _ = fresh_networks()
    images = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    targets = torch.arange(20) % 10
    augment = DSA.for_dataset(digit_like=True)
    applied, timing = [], []
    original_apply = DSA.apply

    def spying_apply(self, x, params):
        applied.append((params.operation, bool(timing)))
        return original_apply(self, x, params)

    real_clock = evaluate_module.time.perf_counter

    def clock():
        timing.append(True)
        return real_clock()

    monkeypatch.setattr(DSA, "apply", spying_apply)
    monkeypatch.setattr(evaluate_module.time, "perf_counter", clock)
    evaluate_module.calibrate_seed_batching(models, images, targets, short(epochs=20), augment)
    before_timing = {operation for operation, timed in applied if not timed}
    assert before_timing == set(augment.strategy) and "flip" not in before_timing
    assert any(timed for _, timed in applied)  # the timed steps augment too


def test_auto_does_not_calibrate_one_seed_or_a_short_training(digits, small_set, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "calibrate_seed_batching", lambda *a, **k: pytest.fail("calibrated"))
    one = evaluate_distilled(small_set, digits, ARCH, short(epochs=25), [0], "cpu", cache_dir=tmp_path)
    assert one.eval_engine == {"path": "sequential", "reason": "auto: one seed, nothing to batch"}
    brief = evaluate_distilled(small_set, digits, ARCH, short(epochs=2), SEEDS, "cpu", cache_dir=tmp_path)
    assert brief.eval_engine == {"path": "sequential", "reason": "auto: 2 training steps, too few to calibrate"}
    assert read_engine_cache(tmp_path) == {}


def test_batch_seeds_option_on_the_command_line_and_in_suites(tmp_path):
    parser = build_parser()
    assert parser.parse_args(["evaluate", "set.json"]).batch_seeds == "auto"
    assert parser.parse_args(["evaluate", "set.json", "--batch-seeds", "off"]).batch_seeds == "off"
    assert parser.parse_args(["run", "--methods", "random", "--batch-seeds", "on"]).batch_seeds == "on"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--methods", "random", "--batch-seeds", "yes"])

    suite_file = tmp_path / "s.yaml"
    suite_file.write_text("version: 1\ndefaults: {batch_seeds: off}\n"
                          "grids:\n  - {datasets: [digits], ipc: [1], methods: [random]}\n"
                          "  - {datasets: [digits], ipc: [1], methods: [random], batch_seeds: on}\n")
    suite = load_suite(str(suite_file))
    assert [grid.batch_seeds for grid in suite.grids] == ["off", "on"]
    assert [r.batch_seeds for r in suite_requests(suite, tmp_path)] == ["off", "on"]
    assert [r.batch_seeds for r in suite_requests(suite, tmp_path, batch_seeds="auto")] == ["auto", "auto"]
    assert load_suite("quick").grids[0].batch_seeds == "auto"
    suite_file.write_text("version: 1\ngrids:\n  - {datasets: [digits], ipc: [1], methods: [random], batch_seeds: fast}\n")
    with pytest.raises(UserError, match="batch_seeds.*auto, on or off"):
        load_suite(str(suite_file))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
@pytest.mark.parametrize("batched", [False, True], ids=["sequential", "batched"])
def test_training_reads_the_gpu_once(batched):
    """At a few images per class a training is launch-bound: a host that waits for the device at every step
    (a loss read, a blocking copy of DSA's parameters or of the epoch's order) cannot queue the next step's
    kernels meanwhile. The loop reads the device once, for the losses it returns."""
    device = torch.device("cuda:0")
    models, generators = fresh_networks()
    models = [m.float().to(device) for m in models]
    images = torch.randn(20, 1, 8, 8, device=device)
    labels = torch.arange(20, device=device) % 10
    protocol = short(epochs=4, batch_size=8)  # 3 steps an epoch
    augment = DSA.for_dataset(True)
    seen: list[torch.Tensor] = []
    torch.cuda.synchronize(device)
    with pytest.warns(UserWarning) as caught:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            if batched:
                train_networks_batched(models, images, labels, protocol, generators, augment,
                                       on_epoch=lambda epoch, loss: seen.append(loss))
            else:
                train_network(models[0], images, labels, protocol, generators[0], augment,
                              on_epoch=lambda epoch, loss: seen.append(loss))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # The first use of sync debug mode in a process also warns that the mode is a prototype: not a synchronisation.
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert len(seen) == 4 * (len(models) if batched else 1) and all(loss.device == device for loss in seen)


def _gpu_problem():
    device = torch.device("cuda:0")
    models, generators = fresh_networks()
    models = [m.float().to(device) for m in models]
    images = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(5)).to(device)
    labels = torch.arange(20, device=device) % 10
    return models, generators, images, labels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_cuda_graph_steps_compute_the_eager_steps(monkeypatch):
    """Replayed from CUDA graphs — batch gather and DSA included — a seed-batched training computes what its eager
    steps compute: batches of 8, 8 and 4 (two sizes) and an lr decay (two learning rates) give four graphs, each
    captured after its warm-up and replayed; with deterministic cuDNN kernels the parameters agree to float32
    rounding, and the generators end in the same state."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    protocol = short(epochs=12, batch_size=8)  # 3 steps an epoch; lr ×0.1 from epoch 7
    models, generators, images, labels = _gpu_problem()
    twins = [copy.deepcopy(m) for m in models]
    twin_generators = [copy.deepcopy(g) for g in generators]
    eager_losses = train_networks_batched(models, images, labels, protocol, generators, DSA.for_dataset(True))
    steps = evaluate_module._CudaGraphSteps(evaluate_module._StackedSteps(SeedStack(twins).train(), protocol))
    graphed_losses = evaluate_module._train(steps, images, labels, protocol, twin_generators, DSA.for_dataset(True),
                                            None)
    steps.steps.stack.write_back()
    assert sorted(size for size, lrs in steps.captured) == [4, 4, 8, 8]  # both batch sizes, both lrs
    assert len({lrs for size, lrs in steps.captured}) == 2
    assert all(torch.equal(g.get_state(), t.get_state()) for g, t in zip(generators, twin_generators))
    for eager, graphed in zip(models, twins):
        for a, b in zip(eager.parameters(), graphed.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_graph_calibration_times_replays_and_rejects_a_replay_that_computes_otherwise(monkeypatch):
    models, generators, images, labels = _gpu_problem()
    protocol = short(epochs=300, batch_size=256)
    seconds, reason = evaluate_module.calibrate_cuda_graphs(models, images, labels, protocol, DSA.for_dataset(True))
    assert reason is None and 0 < seconds < 1
    capture = evaluate_module._CudaGraphSteps._capture

    def stale_inputs(self, *args):  # each step's batch goes into a buffer that the graph does not read
        captured = capture(self, *args)
        return replace(captured, batch_index=captured.batch_index.clone())

    monkeypatch.setattr(evaluate_module._CudaGraphSteps, "_capture", stale_inputs)
    seconds, reason = evaluate_module.calibrate_cuda_graphs(models, images, labels, protocol, DSA.for_dataset(True))
    assert seconds is None and reason.startswith("CUDA graph replay disagreed with eager steps"), reason
