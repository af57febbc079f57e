"""A generic name → object registry, as in lm-evaluation-harness: duplicates raise, typos get a suggestion.

Every other registry in ddbench (datasets, protocols, methods) is a ``Registry``; architectures are the one
exception and live in timm's own registry (see ``bench/models.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import math
import re
import sys
import types
import typing
from importlib.metadata import EntryPoint
from typing import Any, Callable, Generic, Iterator, Literal, TypeVar, Union

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

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin that failed half-way through registering); absent names are ignored."""
        self._entries.pop(name, None)

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
_loaded = False  # true once the built-ins are imported and every plugin has been tried
_loading = False  # while `_load_methods` runs: a plugin that asks for the registry at import sees it as it is
_plugin: str | None = None  # the entry point being loaded (`name = value (distribution 'd')`), else None
_plugin_clashes: set[str] = set()  # the names the entry point being loaded was refused (warned once each)
_plugin_failures: dict[str, str] = {}  # entry-point name → why it failed, for the unknown-method error
_plugin_origins: dict[str, dict] = {}  # method name → the plugin that registered it (records carry it)


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_method("apm")`` on a ``methods.base.Method`` subclass.

    A duplicate name raises ``ValueError``, except while a ``ddbench.methods`` plugin loads: then the method
    already registered (a built-in, or an earlier plugin) keeps the name and the plugin gets one warning line.
    """

    def wrap(cls: type) -> type:
        if _plugin is not None and name in METHODS:
            existing = METHODS.get(name)
            if existing is not cls and name not in _plugin_clashes:
                _plugin_clashes.add(name)
                _warn(f"method plugin {_plugin} registers '{name}', a name already taken by "
                      f"{existing.__module__}.{existing.__qualname__}; keeping that one")
            return cls
        cls.name = name
        return METHODS.register(name, cls)

    return wrap


def _warn(message: str) -> None:
    print(f"ddbench: warning: {message}", file=sys.stderr)


def _describe_entry_point(entry: EntryPoint) -> str:
    """``name = module:attr (distribution 'dist')``; the distribution only where the entry point knows it."""
    dist = getattr(getattr(entry, "dist", None), "name", None)
    return f"{entry.name} = {entry.value}" + (f" (distribution '{dist}')" if dist else "")


def _one_line(exc: BaseException) -> str:
    """``ImportError: No module named 'x'``: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _load_plugin(entry: EntryPoint) -> None:
    """Load one ``ddbench.methods`` entry point: a module whose import registers its methods, or a bare class,
    registered under the entry point's name. A failure is one warning line and undoes what the plugin registered.
    """
    global _plugin, _plugin_clashes
    before = set(METHODS.names())
    _plugin, _plugin_clashes = _describe_entry_point(entry), set()
    try:
        loaded = entry.load()
        if isinstance(loaded, type) and (entry.name not in METHODS or METHODS.get(entry.name) is not loaded):
            register_method(entry.name)(loaded)  # a name already taken: warns, and the existing method stays
        dist = getattr(entry, "dist", None)
        for name in set(METHODS.names()) - before:
            _plugin_origins[name] = {"entry_point": f"{entry.name} = {entry.value}",
                                     "distribution": getattr(dist, "name", None), "version": getattr(dist, "version", None)}
    except (Exception, SystemExit) as exc:  # SystemExit: a plugin that parses sys.argv when imported
        for name in set(METHODS.names()) - before:
            METHODS.unregister(name)
        _plugin_failures[entry.name] = f"plugin {_plugin} failed to load ({_one_line(exc)})"
        _warn(f"method plugin {_plugin} failed to load ({_one_line(exc)}); its methods are unavailable")
    finally:
        _plugin, _plugin_clashes = None, set()


def _load_methods() -> None:
    """Import the built-in methods, then each third-party one from the ``ddbench.methods`` entry points.

    A built-in that fails to import is a bug and raises. A plugin that fails, or registers a name already
    taken, costs one warning line on stderr, and everything else still loads; asking for a method it would have
    provided is then an error that names it.
    """
    global _loaded, _loading
    if _loaded or _loading:
        return
    _loading = True
    try:
        import methods

        for module in methods.BUILTIN:
            importlib.import_module(f"methods.{module}")
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            _load_plugin(entry)
        _loaded = True
    finally:
        _loading = False


def list_methods() -> list[str]:
    """The registered method names: the built-ins, then those of the plugins that loaded."""
    _load_methods()
    return METHODS.names()


def get_method_class(name: str) -> type:
    """The method class registered as ``name``; ``UnknownNameError`` (naming any plugin that failed) if none."""
    _load_methods()
    try:
        return METHODS.get(name)
    except UnknownNameError as exc:
        if name in _plugin_failures:
            raise UnknownNameError(f"method '{name}' is unavailable: its {_plugin_failures[name]}") from None
        if _plugin_failures:
            failed = "; ".join(_plugin_failures.values())
            raise UnknownNameError(f"{exc} (not loaded: {failed})") from None
        raise


def method_origin(name: str) -> dict | None:
    """Where method ``name`` comes from: None for a built-in (the harness's own git stamp covers it), else its
    plugin's entry point, distribution and version — what a record needs to say which code made it."""
    _load_methods()
    return _plugin_origins.get(name)


def split_method_spec(spec: str) -> tuple[str, str | None]:
    """``"apm.cifar10_ipc50"`` → ``("apm", "cifar10_ipc50")``; ``"random"`` → ``("random", None)``."""
    name, dot, recipe = spec.partition(".")
    if dot and not recipe:
        raise UserError(f"method '{spec}': a recipe name must follow the '.' ('{name}' alone for the default recipe)")
    return name, (recipe or None)


ALLOW_NEGATIVE = "allow_negative"  # `field(default=-1.0, metadata={ALLOW_NEGATIVE: True})`: no sign check


class _Mismatch(Exception):
    """A value that does not have the annotated type; the caller names the whole annotation."""


def _type_name(annotation: object) -> str:
    """``int``, ``list[int]``, ``one of 'a', 'b'``, ``float or None``: an annotation as an error message says it."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is Union or origin is types.UnionType:
        return " or ".join(map(_type_name, args))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not args:
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_YAML11_MISSED_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: object, annotation: object, option: str, nonnegative: bool) -> object:
    """``value`` checked against ``annotation`` and converted (an int to a float, a YAML list to a tuple).

    Raises ``_Mismatch`` for a wrong type, and ``UserError`` for a number that is not finite or, with
    ``nonnegative``, below 0 (also inside lists, tuples and dicts).
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is object:
        return value
    if annotation is None or annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Union or origin is types.UnionType:  # `X | None`, `Optional[X]`, `int | str`: the first arm that fits
        for arm in args:
            try:
                return _coerce(value, arm, option, nonnegative)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float and isinstance(value, str) and _YAML11_MISSED_FLOAT.fullmatch(value.strip()):
        value = float(value)  # PyYAML (YAML 1.1) reads `1e-5` as a string; YAML 1.2 and Python read a number
    if annotation is int or annotation is float:
        if isinstance(value, bool) or not isinstance(value, int if annotation is int else (int, float)):
            raise _Mismatch
        if not math.isfinite(value) or nonnegative and value < 0:
            rule = "non-negative" if nonnegative else "finite"
            raise UserError(f"{option} must be a {rule} number, got {value!r}")
        return annotation(value)
    if origin in (list, set, frozenset) or annotation in (list, set, frozenset):
        if not isinstance(value, (list, tuple, set, frozenset)):
            raise _Mismatch
        item = args[0] if args else Any
        return (origin or annotation)(_coerce(v, item, option, nonnegative) for v in value)
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if not args or len(args) == 2 and args[1] is Ellipsis:  # `tuple`, `tuple[X, ...]`
            return tuple(_coerce(v, args[0] if args else Any, option, nonnegative) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, arg, option, nonnegative) for v, arg in zip(value, args))
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key_type, value_type = args or (Any, Any)
        return {_coerce(k, key_type, option, nonnegative): _coerce(v, value_type, option, nonnegative)
                for k, v in value.items()}
    expected = origin if isinstance(origin, type) else annotation
    if isinstance(expected, type):  # str, a plugin's own class, collections.abc.Sequence[...]
        if isinstance(value, expected):
            return value
        raise _Mismatch
    return value  # an annotation this checker does not know (a TypeVar, Callable[...]): taken as given


def _check_value(method: str, key: str, value: object, annotation: object, allow_negative: bool = False) -> object:
    """One method option checked against its ``Config`` annotation; ``UserError`` (one line) when it does not fit.

    Numbers must be finite and, unless the field opts out with ``metadata={"allow_negative": True}``,
    non-negative: every built-in option is a count, a rate, a weight or a size.
    """
    option = f"method '{method}': option '{key}'"
    try:
        return _coerce(value, annotation, option, nonnegative=not allow_negative)
    except _Mismatch:
        raise UserError(f"{option} must be {_type_name(annotation)}, got {value!r}") from None


def resolve_config(name: str, recipe: str | None, quick: bool, overrides: dict) -> tuple[object, dict]:
    """Config defaults ← named recipe ← quick overrides ← user overrides, checked key by key and by type."""
    cls = get_method_class(name)
    if recipe is not None and recipe not in cls.recipes:
        raise UnknownNameError(unknown_name_message(f"method '{name}' recipe", recipe, list(cls.recipes)))
    hints = typing.get_type_hints(cls.Config)
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    values: dict = {}

    def apply(layer: dict) -> None:
        for key, value in layer.items():
            if key not in fields:
                raise UnknownNameError(unknown_name_message(f"method '{name}' option", key, sorted(fields)))
            allow_negative = bool(fields[key].metadata.get(ALLOW_NEGATIVE, False))
            values[key] = _check_value(name, key, value, hints[key], allow_negative)

    apply(cls.recipes.get(recipe, {}) if recipe else {})
    if quick:  # a dict of overrides, or a function of the recipe's resolved config (scaled copies)
        apply(cls.quick(dataclasses.asdict(cls.Config(**values))) if callable(cls.quick) else cls.quick)
    apply(overrides)
    config = cls.Config(**values)
    return config, dataclasses.asdict(config)


DATASET_RECIPE_ALIASES = {"tiny_imagenet": "tiny", "imagenet64": "imagenet"}


def setting_recipe_names(dataset: str, ipc: int | None) -> tuple[str, str]:
    """The names a recipe for this setting goes by: ``<dataset>_ipc<k>``, and the same with the dataset's short
    name where recipes use one (``tiny_ipc10`` for tiny_imagenet)."""
    return f"{dataset}_ipc{ipc}", f"{DATASET_RECIPE_ALIASES.get(dataset, dataset)}_ipc{ipc}"


def default_recipe(name: str, dataset: str, ipc: int | None) -> str | None:
    """The method's paper recipe for this setting (``<dataset>_ipc<k>``), if it has one."""
    cls = get_method_class(name)
    for key in setting_recipe_names(dataset, ipc):
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
