"""Registries: duplicates raise, typos get the nearest name, method configs are typed."""

import pytest

from bench.errors import UnknownNameError, UserError
from bench.registry import Registry, create_method, list_methods, resolve_config


def test_duplicate_registration_raises():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)


def test_unknown_name_suggests_nearest():
    reg = Registry("thing")
    for name in ("convnet", "random", "herding"):
        reg.register(name, name)
    with pytest.raises(UnknownNameError, match="did you mean 'herding'"):
        reg.get("hearding")
    with pytest.raises(UnknownNameError) as exc:
        reg.get("zzzzzz")
    assert "did you mean" not in str(exc.value) and "known:" in str(exc.value)


def test_builtin_methods_registered():
    assert {"random", "herding", "full"} <= set(list_methods())


def test_create_method_with_typed_overrides_and_quick():
    method = create_method("herding", quick=True, lr=0.05)
    assert method.config.embed_epochs == 10 and method.config.lr == 0.05 and method.quick
    assert method.resolved_config == {"embed_epochs": 10, "lr": 0.05, "batch_size": 256}


def test_unknown_method_option_and_recipe_and_type():
    with pytest.raises(UnknownNameError, match="did you mean 'embed_epochs'"):
        create_method("herding", embed_epoch=3)
    with pytest.raises(UnknownNameError, match="recipe"):
        create_method("herding.cifar10_ipc99")
    with pytest.raises(UserError, match="must be"):
        resolve_config("herding", None, False, {"embed_epochs": "many"})
    with pytest.raises(UnknownNameError, match="did you mean 'random'"):
        create_method("randomm")
