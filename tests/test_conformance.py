"""Every registered method passes the conformance check (`bench/conformance.py`, also `ddbench check NAME`): shapes,
labels, determinism, metadata, no global RNG use — and the check itself catches a method that breaks them.

A method joins this test by registering itself; its ``smoke`` overrides (on top of ``quick``) keep it short.
"""

import pytest
import torch

from bench.cli import main
from bench.conformance import check_method
from bench.data import load_dataset
from bench.distilled import DistilledSet
from bench.registry import list_methods, register_method
from methods.base import DistillContext, Method


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("name", list_methods())
def test_method_conformance(name, digits):
    checks = check_method(name, digits)
    failures = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
    assert not failures, failures
    assert len(checks) >= 7


class UsesGlobalRNGAndDropsAClass(Method):
    """Draws from the global RNG (so two runs differ) and returns one class short."""

    def distill(self, ctx: DistillContext) -> DistilledSet:
        images, labels = [], []
        for c in range(ctx.dataset.num_classes - 1):
            images.append(torch.rand(ctx.ipc, *ctx.dataset.image_shape))  # the global RNG, on purpose
            labels.append(torch.full((ctx.ipc,), c, dtype=torch.int64))
        return DistilledSet(torch.cat(images), torch.cat(labels))


@pytest.fixture
def broken_method():
    from bench.registry import METHODS

    register_method("conformance_broken")(UsesGlobalRNGAndDropsAClass)
    yield "conformance_broken"
    METHODS.unregister("conformance_broken")


def test_the_check_fails_a_method_that_breaks_the_rules(broken_method, digits):
    verdict = {c.name: c.passed for c in check_method(broken_method, digits)}
    assert verdict["distils digits at ipc 2"]
    assert not verdict["leaves the global torch RNG alone"]
    assert not verdict["images have shape (n, C, H, W)"]
    assert not verdict["the same seed gives the same set"]


def test_ddbench_check_prints_each_check_and_exits_1_on_a_failure(broken_method, capsys):
    assert main(["check", broken_method]) == 1
    out = capsys.readouterr().out
    assert "FAIL leaves the global torch RNG alone" in out and "check(s) failed" in out


def test_ddbench_check_passes_a_conforming_method_and_refuses_an_unknown_one(capsys):
    assert main(["check", "random"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    assert main(["check", "randum"]) == 2
    assert "did you mean 'random'" in capsys.readouterr().err
