"""DSA: the siamese property, gradient flow, the operations' semantics, determinism through generators."""

import math

import pytest
import torch

from bench.augment import ALL_OPERATIONS, DSA, AugmentParams


def batch(n=4, c=3, h=8, w=8, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_digit_datasets_never_flip():
    assert "flip" not in DSA.for_dataset(digit_like=True).strategy
    assert DSA.for_dataset(digit_like=False).strategy == ALL_OPERATIONS


def test_siamese_parameters_are_shared_by_real_and_synthetic_batches():
    dsa = DSA()
    for op in ALL_OPERATIONS:
        only = DSA((op,))
        params = only.siamese(batch(), torch.Generator().manual_seed(3))
        assert params.operation == op
        image = batch(1, seed=7)
        real = torch.cat([image, batch(5, seed=1)])  # batch sizes differ, as real vs synthetic do
        syn = torch.cat([image, batch(2, seed=2)])
        # the same image in both batches gets exactly the same transformation
        assert torch.equal(only.apply(real, params)[0], only.apply(syn, params)[0]), op
    assert dsa.strategy == ALL_OPERATIONS


def test_per_image_parameters_differ_within_a_batch():
    image = batch(1, seed=7).expand(16, -1, -1, -1)
    out = DSA(("rotate",))(image, torch.Generator().manual_seed(0))
    assert not torch.allclose(out[0], out[1])


def test_gradients_reach_the_images_through_every_operation():
    for op in ALL_OPERATIONS:
        x = batch().requires_grad_(True)
        DSA((op,))(x, torch.Generator().manual_seed(1)).pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0, op


def test_same_generator_state_same_augmentation():
    x = batch()
    a = DSA()(x, torch.Generator().manual_seed(5))
    b = DSA()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    DSA()(batch(), torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_crop_is_a_zero_padded_translation():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = DSA(("crop",)).apply(x, AugmentParams("crop", {"shift_x": torch.tensor([1]), "shift_y": torch.tensor([0])}))
    # output row r reads input row r + 1; the last row leaves the image and reads the zero border
    assert torch.equal(out[0, 0, :3], x[0, 0, 1:]) and torch.equal(out[0, 0, 3], torch.zeros(4))


def test_cutout_zeroes_a_half_side_square():
    x = torch.ones(1, 1, 8, 8)
    out = DSA(("cutout",)).apply(x, AugmentParams("cutout", {"centre_x": torch.tensor([4]), "centre_y": torch.tensor([4])}))
    assert out.sum() == 64 - 16 and out[0, 0, 2:6, 2:6].sum() == 0


def test_flip_and_identity_affine():
    x = batch(2)
    flipped = DSA(("flip",)).apply(x, AugmentParams("flip", {"flip": torch.tensor([True, False])}))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    same = DSA(("scale",)).apply(x, AugmentParams("scale", {"sx": torch.ones(1), "sy": torch.ones(1)}))
    assert torch.allclose(same, x, atol=1e-5)
    rotated = DSA(("rotate",)).apply(x, AugmentParams("rotate", {"angle": torch.zeros(1)}))
    assert torch.allclose(rotated, x, atol=1e-5)


def test_parameters_span_the_official_ranges():
    """ParamDiffAug's brightness 1.0, saturation 2.0, contrast 0.5, ratio_scale 1.2 (sx, sy each uniform in
    [1/1.2, 1.2]) and ratio_rotate 15 (uniform in ±15°, in radians): 10,000 uniform draws fill each range to within
    1 % of its width at both ends, and never leave it. ratio_crop_pad 0.125: integer shifts in
    ±int(0.125·side + 0.5) per axis (±4 rows and ±2 columns at 32×16), every one of them drawn."""
    generator = torch.Generator().manual_seed(0)
    draws = {op: DSA((op,)).sample(10_000, (32, 16), generator).values for op in ("color", "scale", "rotate", "crop")}
    angle = 15 * math.pi / 180
    for op, name, low, high in (
        ("color", "brightness", -0.5, 0.5), ("color", "saturation", 0.0, 2.0), ("color", "contrast", 0.5, 1.5),
        ("scale", "sx", 1 / 1.2, 1.2), ("scale", "sy", 1 / 1.2, 1.2), ("rotate", "angle", -angle, angle),
    ):
        values, margin = draws[op][name], 0.01 * (high - low)
        assert low <= values.min() < low + margin and high - margin < values.max() <= high, name
    assert not torch.equal(draws["scale"]["sx"], draws["scale"]["sy"])  # independent per axis
    for name, side, bound in (("shift_x", 32, 4), ("shift_y", 16, 2)):
        shifts = draws["crop"][name]
        assert bound == int(0.125 * side + 0.5)
        assert not shifts.is_floating_point() and set(shifts.tolist()) == set(range(-bound, bound + 1)), name


def test_rotation_turns_counterclockwise_as_the_official_affine_grid():
    """The official rand_rotate builds θ = [[cos a, −sin a, 0], [sin a, cos a, 0]] for affine_grid, which samples
    output point q (x = column, y = row, pointing down) from the input at θq: a pixel at p lands at R(−a)p. For
    a = 90° the top-centre pixel goes to the middle of the left edge (the official comment: "90: anticlockwise 90
    degree"); for a drawn angle, an off-centre pixel's intensity centroid lands where R(−a) puts it."""
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 2] = 1.0
    quarter = DSA(("rotate",)).apply(x, AugmentParams("rotate", {"angle": torch.tensor([math.pi / 2])}))
    expected = torch.zeros_like(x)
    expected[0, 0, 2, 0] = 1.0
    assert torch.allclose(quarter, expected, atol=1e-5)

    dsa = DSA(("rotate",))
    params = dsa.sample(1, (21, 21), torch.Generator().manual_seed(8))
    a = float(params.values["angle"])
    assert math.radians(8) < abs(a) <= math.radians(15)
    image = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    image[0, 0, 10, 18] = 1.0  # 8 pixels right of the centre (10, 10)
    out = dsa.apply(image, params)[0, 0]
    rows, cols = torch.meshgrid(torch.arange(21.0, dtype=torch.float64), torch.arange(21.0, dtype=torch.float64), indexing="ij")
    centroid = (float((rows * out).sum() / out.sum()), float((cols * out).sum() / out.sum()))
    assert centroid == pytest.approx((10 - 8 * math.sin(a), 10 + 8 * math.cos(a)), abs=0.05)


def test_branch_free_augmentation_gives_each_batch_its_own_draw_exactly():
    """``apply_packed`` (what a CUDA graph replays: every operation on every image, each image keeping its own
    batch's) gives bit for bit the images of ``augment_each``, for every operation drawn, both strategies, float32
    and float64, batches of one size (a seed stack) and of several; and consumes nothing from the generators."""
    operations_seen = set()
    for digit_like in (True, False):
        dsa = DSA.for_dataset(digit_like)
        for dtype in (torch.float32, torch.float64):
            for trial in range(12):
                sizes = [6, 6, 6, 6, 6] if trial % 2 else [5, 3]
                batches = [batch(n, 3, 8, 8, seed=100 * trial + i).to(dtype) for i, n in enumerate(sizes)]
                generators = [torch.Generator().manual_seed(10 * trial + i) for i in range(len(sizes))]
                twins = [torch.Generator().manual_seed(10 * trial + i) for i in range(len(sizes))]
                expected = torch.cat(dsa.augment_each(batches, generators))
                drawn = [dsa.sample(n, (8, 8), g) for n, g in zip(sizes, twins)]
                operations_seen.update(params.operation for params in drawn)
                packed = dsa.pack(drawn, sizes)
                assert packed.dtype == torch.float64 and packed.shape[1] == sum(sizes)
                assert torch.equal(dsa.apply_packed(torch.cat(batches), packed), expected)
                assert all(torch.equal(g.get_state(), t.get_state()) for g, t in zip(generators, twins))
    assert operations_seen == set(ALL_OPERATIONS)


def test_branch_free_augmentation_keeps_the_identity_where_another_operation_was_drawn():
    dsa = DSA(("cutout", "flip"))
    x = batch(4)
    drawn = [AugmentParams("flip", {"flip": torch.tensor([True, True])}),
             AugmentParams("cutout", {"centre_x": torch.tensor([4, 4]), "centre_y": torch.tensor([4, 4])})]
    out = dsa.apply_packed(x, dsa.pack(drawn, [2, 2]))
    assert torch.equal(out[:2], x[:2].flip(3))
    assert torch.equal(out[2:, :, 2:6, 2:6], torch.zeros(2, 3, 4, 4)) and torch.equal(out[2:, :, 0], x[2:, :, 0])
