"""A generic name → object registry, as in lm-evaluation-harness: duplicates raise, typos get a suggestion.

Every other registry in ddbench (datasets, protocols, methods) is a ``Registry``; architectures are the one
exception and live in timm's own registry (see ``bench/models.py``).
"""

from __future__ import annotations

import difflib
import math
from typing import Callable, Generic, Iterator, TypeVar

from bench.errors import UnknownNameError, UserError

T = TypeVar("T")


def nearest_name(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``name`` by edit similarity, or None when nothing is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if close:
        return close[0]
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[close[0]] if close else None


def unknown_name_message(kind: str, name: str, candidates: list[str]) -> str:
    suggestion = nearest_name(name, candidates)
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown {kind} '{name}'{hint} (known: {', '.join(sorted(candidates)) or 'none'})"


class Registry(Generic[T]):
    """Names to objects. ``register`` raises on a duplicate; ``get`` raises ``UnknownNameError``."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(obj: T) -> T:
            return self.register(name, obj)

        return wrap

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(unknown_name_message(self.kind, name, list(self._entries))) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)


# --------------------------------------------------------------------------------------------------------------
# Methods: `register_method`, `list_methods`, `create_method("name.recipe", quick=…, **overrides)`

ENTRY_POINT_GROUP = "ddbench.methods"
METHODS: Registry[type] = Registry("method")
_loaded = False


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_method("apm")`` on a ``methods.base.Method`` subclass."""

    def wrap(cls: type) -> type:
        cls.name = name
        return METHODS.register(name, cls)

    return wrap


def _load_methods() -> None:
    """Import the built-in methods, then any third-party ones from the ``ddbench.methods`` entry points."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    from importlib.metadata import entry_points

    import methods

    for module in methods.BUILTIN:
        importlib.import_module(f"methods.{module}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry.load()  # importing the module registers it; a bare class is registered here
        if isinstance(loaded, type) and entry.name not in METHODS:
            register_method(entry.name)(loaded)


def list_methods() -> list[str]:
    _load_methods()
    return METHODS.names()


def get_method_class(name: str) -> type:
    _load_methods()
    return METHODS.get(name)


def split_method_spec(spec: str) -> tuple[str, str | None]:
    """``"apm.cifar10_ipc50"`` → ``("apm", "cifar10_ipc50")``; ``"random"`` → ``("random", None)``."""
    name, _, recipe = spec.partition(".")
    return name, (recipe or None)


def _check_value(method: str, key: str, value: object, annotation: object) -> object:
    text = str(annotation)
    if value is None and "None" in text:
        return value
    if "bool" in text and isinstance(value, bool):
        return value
    if ("float" in text and isinstance(value, (int, float)) or "int" in text and isinstance(value, int)) \
            and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:  # every numeric option is a count, a rate, a weight or a size
            raise UserError(f"method '{method}': option '{key}' must be a non-negative number, got {value!r}")
        return float(value) if "float" in text else value
    if "str" in text and isinstance(value, str):
        return value
    if "tuple" in text and isinstance(value, (list, tuple)):
        return tuple(value)
    expected = getattr(annotation, "__name__", text) if isinstance(annotation, type) else text
    raise UserError(f"method '{method}': option '{key}' must be {expected}, got {value!r}")


def resolve_config(name: str, recipe: str | None, quick: bool, overrides: dict) -> tuple[object, dict]:
    """Config defaults ← named recipe ← quick overrides ← user overrides, checked key by key and by type."""
    import dataclasses
    import typing

    cls = get_method_class(name)
    if recipe is not None and recipe not in cls.recipes:
        raise UnknownNameError(unknown_name_message(f"method '{name}' recipe", recipe, list(cls.recipes)))
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    values: dict = {}

    def apply(layer: dict) -> None:
        for key, value in layer.items():
            if key not in fields:
                raise UnknownNameError(unknown_name_message(f"method '{name}' option", key, sorted(fields)))
            values[key] = _check_value(name, key, value, hints[key])

    apply(cls.recipes.get(recipe, {}) if recipe else {})
    if quick:  # a dict of overrides, or a function of the recipe's resolved config (scaled copies)
        apply(cls.quick(dataclasses.asdict(cls.Config(**values))) if callable(cls.quick) else cls.quick)
    apply(overrides)
    config = cls.Config(**values)
    return config, dataclasses.asdict(config)


DATASET_RECIPE_ALIASES = {"tiny_imagenet": "tiny", "imagenet64": "imagenet"}


def default_recipe(name: str, dataset: str, ipc: int | None) -> str | None:
    """The method's paper recipe for this setting (``<dataset>_ipc<k>``), if it has one."""
    cls = get_method_class(name)
    for key in (f"{dataset}_ipc{ipc}", f"{DATASET_RECIPE_ALIASES.get(dataset, dataset)}_ipc{ipc}"):
        if key in cls.recipes:
            return key
    return None


def create_method(spec: str, quick: bool = False, **overrides: object) -> object:
    """Build a method from ``name[.recipe]``; the instance carries ``recipe``, ``quick`` and ``resolved_config``."""
    name, recipe = split_method_spec(spec)
    cls = get_method_class(name)
    config, resolved = resolve_config(name, recipe, quick, overrides)
    method = cls(config)
    method.recipe, method.quick, method.resolved_config = recipe, quick, resolved
    return method
