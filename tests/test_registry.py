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


def test_third_party_methods_register_through_entry_points(monkeypatch):
    """A package that declares `[project.entry-points."ddbench.methods"] mine = "pkg.module:MyMethod"`."""
    import importlib.metadata
    import sys
    import types
    from dataclasses import dataclass

    import bench.registry as registry
    from methods.base import Method, MethodConfig

    module = types.ModuleType("third_party_distiller")

    @dataclass
    class MineConfig(MethodConfig):
        strength: float = 1.0

    class Mine(Method):
        Config = MineConfig

        def distill(self, ctx):  # pragma: no cover - only registration is tested here
            raise NotImplementedError

    module.Mine = Mine
    monkeypatch.setitem(sys.modules, "third_party_distiller", module)
    entry = importlib.metadata.EntryPoint("mine", "third_party_distiller:Mine", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [entry] if group == registry.ENTRY_POINT_GROUP else [])
    registry.list_methods()  # the built-ins first, as in any run
    monkeypatch.setattr(registry.METHODS, "_entries", dict(registry.METHODS._entries))  # restored afterwards
    monkeypatch.setattr(registry, "_loaded", False)
    assert "mine" in registry.list_methods() and "apm" in registry.list_methods()
    assert registry.create_method("mine", strength=2).config.strength == 2.0


def test_scientific_notation_is_a_number_for_float_options():
    """PyYAML (YAML 1.1) reads `1e-5` as a string; `--set lr_lr=1e-5` and suites must still mean 1e-5."""
    import yaml

    _, resolved = resolve_config("mtt", None, False, {"lr_lr": yaml.safe_load("1e-5"), "lr_img": yaml.safe_load("2E+3")})
    assert resolved["lr_lr"] == 1e-5 and resolved["lr_img"] == 2000.0
    with pytest.raises(UserError, match="must be"):  # only a number literal is taken, and only for a float option
        resolve_config("mtt", None, False, {"lr_lr": "1e-5x"})
    with pytest.raises(UserError, match="must be"):
        resolve_config("mtt", None, False, {"syn_steps": "1e3"})
    with pytest.raises(UserError, match="non-negative"):
        resolve_config("mtt", None, False, {"lr_lr": "-1e-5"})
