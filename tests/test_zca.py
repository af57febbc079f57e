"""ZCA whitening: against the formula, against kornia's ZCAWhitening(eps=0.1), and fitted on train only."""

import pytest
import torch

from bench.data import ZCA, load_dataset


def images(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 4, 4, generator=g)
    return torch.cat([base, base * 0.5 + 0.1 * torch.rand(n, 1, 4, 4, generator=g)], dim=1)  # correlated channels


def test_zca_matches_the_formula():
    x = images().double()
    flat = x.reshape(len(x), -1)
    centred = flat - flat.mean(0)
    cov = centred.T @ centred / (len(x) - 1)
    evals, evecs = torch.linalg.eigh(cov)
    w = evecs @ torch.diag((evals + 0.1) ** -0.5) @ evecs.T
    expected = (centred @ w).reshape(x.shape)
    zca = ZCA.fit(x.float())
    assert torch.allclose(zca(x.float()).double(), expected, atol=1e-4)
    assert torch.allclose(zca.inverse(zca(x.float())), x.float(), atol=1e-4)


def test_zca_equals_kornia():
    kornia = pytest.importorskip("kornia")
    x = images()
    ours = ZCA.fit(x)
    theirs = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(x)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def test_zca_is_fitted_on_train_only_and_applied_to_test():
    ds = load_dataset("digits", zca=True)
    plain = load_dataset("digits", zca=False)
    assert ds.transform["kind"] == "zca" and ds.transform["fitted_on"] == "train"
    raw_train = plain.train_images * torch.tensor(plain.transform["std"]).view(1, -1, 1, 1) + torch.tensor(plain.transform["mean"]).view(1, -1, 1, 1)
    refit = ZCA.fit(raw_train)
    assert torch.allclose(refit.mean, ds.zca.mean, atol=1e-5)
    raw_test = plain.test_images * torch.tensor(plain.transform["std"]).view(1, -1, 1, 1) + torch.tensor(plain.transform["mean"]).view(1, -1, 1, 1)
    assert torch.allclose(ds.test_images, refit(raw_test), atol=1e-4)
