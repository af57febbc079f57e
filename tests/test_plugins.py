"""Third-party methods (entry-point group ``ddbench.methods``): a broken or clashing plugin costs one warning line,
never the built-ins; plugin options may have any checked type (lists, literals, optionals, negative numbers).

Each test installs a real distribution into a temporary folder on ``sys.path`` — a ``*.dist-info`` with
``entry_points.txt`` beside the plugin modules — so ``importlib.metadata`` finds it as it would an installed one.
"""

import sys
import textwrap

import pytest

import bench.registry as registry
from bench.cli import _options, main
from bench.errors import UnknownNameError, UserError

PREFIX = "ddbench_test_plugin_"  # every plugin module's name starts so, and is dropped from sys.modules afterwards

GOOD = '''
from dataclasses import dataclass
from bench.registry import register_method
from methods.base import Method, MethodConfig

@dataclass
class GoodConfig(MethodConfig):
    strength: float = 1.0

@register_method("good")
class Good(Method):
    Config = GoodConfig

    def distill(self, ctx):
        raise NotImplementedError
'''

BROKEN = '''
from bench.registry import register_method
from methods.base import Method

@register_method("half")  # registered, then the import fails: undone
class Half(Method):
    def distill(self, ctx):
        raise NotImplementedError

raise ImportError("No module named 'some_missing_dependency'\\nand a second line of detail")
'''


@pytest.fixture
def install(monkeypatch, tmp_path):
    """``install({"name": "module[:attr]"}, module=source, …)``: a distribution ``ddbench-test-plugins`` with those
    entry points and modules (named ``PREFIX + module``), and a registry that loads afresh; all undone after."""
    registry.list_methods()  # the built-ins, imported once per process as in any run
    monkeypatch.setattr(registry.METHODS, "_entries", dict(registry.METHODS._entries))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_plugin_failures", {}, raising=False)
    monkeypatch.setattr(registry, "_plugin_origins", {})

    def write(entries: dict[str, str], **modules: str) -> None:
        for module, source in modules.items():
            (tmp_path / f"{PREFIX}{module}.py").write_text(textwrap.dedent(source))
        info = tmp_path / "ddbench_test_plugins-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ddbench-test-plugins\nVersion: 1.0\n")
        lines = [f"{name} = {PREFIX}{target}" for name, target in entries.items()]
        (info / "entry_points.txt").write_text("[ddbench.methods]\n" + "\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))

    yield write
    for module in [m for m in sys.modules if m.startswith(PREFIX)]:
        del sys.modules[module]


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("ddbench: warning:")]


def test_a_plugin_that_fails_to_import_is_one_warning_and_everything_else_loads(install, capsys):
    install({"broken": "broken", "good": "good"}, broken=BROKEN, good=GOOD)
    names = registry.list_methods()
    assert {"random", "apm", "good"} <= set(names) and "half" not in names and "broken" not in names
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(warnings_in(err)) == 1, err
    for part in (f"broken = {PREFIX}broken", "distribution 'ddbench-test-plugins'",
                 "ImportError: No module named 'some_missing_dependency'"):
        assert part in err
    assert "second line" not in err
    assert registry.create_method("good", strength=2).config.strength == 2.0


def test_a_plugins_methods_say_where_they_come_from(install):
    """Records carry it (``method_origin``): the harness's git stamp says nothing of a plugin's code."""
    install({"good": "good"}, good=GOOD)
    assert registry.method_origin("good") == {"entry_point": f"good = {PREFIX}good",
                                              "distribution": "ddbench-test-plugins", "version": "1.0"}
    assert registry.method_origin("random") is None


def test_ls_methods_marks_a_plugins_methods(install, capsys):
    install({"good": "good"}, good=GOOD)
    assert main(["ls", "methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["good"].endswith("(plugin: ddbench-test-plugins)") and "plugin" not in lines["random"]


def test_asking_for_the_method_of_a_failed_plugin_names_the_plugin(install, capsys):
    install({"broken": "broken"}, broken=BROKEN)
    with pytest.raises(UnknownNameError) as exc:
        registry.get_method_class("broken")
    message = str(exc.value)
    assert "\n" not in message and f"plugin broken = {PREFIX}broken" in message and "ImportError" in message
    with pytest.raises(UnknownNameError, match=f"did you mean 'random'.*not loaded: plugin broken = {PREFIX}broken"):
        registry.get_method_class("randm")
    assert registry.get_method_class("random").__module__ == "methods.random"


def test_commands_still_work_beside_a_broken_plugin(install, capsys, tmp_path):
    install({"broken": "broken"}, broken=BROKEN)
    assert main(["ls", "methods"]) == 0
    out, err = capsys.readouterr()
    assert "random" in out and "Traceback" not in err and len(warnings_in(err)) == 1
    registry._loaded = False  # a new command in a fresh process: the warning again, and a one-line error
    code = main(["distill", "--dataset", "digits", "--method", "broken", "--ipc", "1", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if not line.startswith("ddbench: warning:")] == [
        f"ddbench: error: method 'broken' is unavailable: its plugin broken = {PREFIX}broken (distribution "
        "'ddbench-test-plugins') failed to load (ImportError: No module named 'some_missing_dependency')"]


def test_a_plugin_that_registers_a_taken_name_is_one_warning_and_the_builtin_wins(install, capsys):
    install({"clash": "clash"}, clash='''
        from bench.registry import register_method
        from methods.base import Method

        @register_method("random")
        class NotRandom(Method):
            def distill(self, ctx):
                raise NotImplementedError

        @register_method("mine")  # the rest of the module still loads
        class Mine(Method):
            def distill(self, ctx):
                raise NotImplementedError
        ''')
    names = registry.list_methods()
    assert registry.get_method_class("random").__module__ == "methods.random" and "mine" in names
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"clash = {PREFIX}clash" in warning and "'random'" in warning and "methods.random" in warning


def test_a_bare_class_entry_point_on_a_taken_name_is_one_warning(install, capsys):
    install({"random": "bare:Bare", "bare": "bare:Bare"}, bare='''
        from methods.base import Method

        class Bare(Method):
            def distill(self, ctx):
                raise NotImplementedError
        ''')
    names = registry.list_methods()
    assert registry.get_method_class("random").__module__ == "methods.random"
    assert registry.get_method_class("bare").__name__ == "Bare" and "bare" in names
    (warning,) = warnings_in(capsys.readouterr().err)
    assert f"random = {PREFIX}bare:Bare" in warning and "'random'" in warning


def test_a_load_interrupted_halfway_is_redone_by_the_next_call(install, tmp_path):
    """``_loaded`` turns true only after every plugin was tried: no partial registry in a long-lived process."""
    install({"interrupting": "interrupting", "good": "good"}, good=GOOD, interrupting=f'''
        import pathlib
        seen = pathlib.Path({str(tmp_path / "seen")!r})
        if not seen.exists():
            seen.touch()
            raise KeyboardInterrupt
        ''')
    with pytest.raises(KeyboardInterrupt):
        registry.list_methods()
    assert "good" in registry.list_methods()


TYPED = '''
from dataclasses import dataclass, field
from typing import Literal, Optional
from bench.registry import register_method
from methods.base import Method, MethodConfig

@dataclass
class TypedConfig(MethodConfig):
    milestones: list[int] = field(default_factory=lambda: [5])
    mode: Literal["a", "b"] = "a"
    shift: float = field(default=-1.0, metadata={"allow_negative": True})
    scale: float = 1.0
    gamma: float | None = None
    limit: Optional[int] = None
    size: tuple[int, int] = (8, 8)
    weights: dict[str, float] = field(default_factory=dict)

@register_method("typed")
class Typed(Method):
    Config = TypedConfig

    def distill(self, ctx):
        raise NotImplementedError
'''


def test_plugin_options_of_any_checked_type_from_set_pairs(install):
    install({"typed": "typed"}, typed=TYPED)
    options = _options(["milestones=[3, 7]", "mode=b", "shift=-2.0", "gamma=0.5", "limit=null", "size=[4, 6]",
                        "weights={a: 1, b: 0.5}"])
    config = registry.create_method("typed", **options).config
    assert config.milestones == [3, 7] and config.mode == "b" and config.shift == -2.0 and config.gamma == 0.5
    assert config.limit is None and config.size == (4, 6) and config.weights == {"a": 1.0, "b": 0.5}
    assert isinstance(config.weights["a"], float)


@pytest.mark.parametrize("pair,message", [
    ("milestones=[x]", "option 'milestones' must be list[int], got ['x']"),
    ("milestones=3", "option 'milestones' must be list[int], got 3"),
    ("milestones=[-3]", "option 'milestones' must be a non-negative number, got -3"),
    ("mode=c", "option 'mode' must be one of 'a', 'b', got 'c'"),
    ("shift=.nan", "option 'shift' must be a finite number, got nan"),
    ("shift=-.inf", "option 'shift' must be a finite number, got -inf"),
    ("scale=-2.0", "option 'scale' must be a non-negative number, got -2.0"),
    ("gamma=high", "option 'gamma' must be float or None, got 'high'"),
    ("limit=-1", "option 'limit' must be a non-negative number, got -1"),
    ("size=[4]", "option 'size' must be tuple[int, int], got [4]"),
    ("weights={a: x}", "option 'weights' must be dict[str, float], got {'a': 'x'}"),
])
def test_plugin_options_of_the_wrong_type_or_sign_are_one_line_errors(install, pair, message):
    install({"typed": "typed"}, typed=TYPED)
    with pytest.raises(UserError) as exc:
        registry.create_method("typed", **_options([pair]))
    assert str(exc.value) == f"method 'typed': {message}"


@pytest.mark.parametrize("method,option,value,message", [
    ("dm", "iterations", -5, "must be a non-negative number, got -5"),
    ("apm", "lr_img", float("nan"), "must be a non-negative number, got nan"),
    ("herding", "lr", float("inf"), "must be a non-negative number, got inf"),
    ("apm", "batch_syn", -1, "must be a non-negative number, got -1"),
    ("dm", "iterations", True, "must be int, got True"),
    ("apm", "segment", "all", "must be int or None, got 'all'"),
])
def test_builtin_options_stay_finite_and_non_negative(method, option, value, message):
    with pytest.raises(UserError, match=f"option '{option}' {message}"):
        registry.resolve_config(method, None, False, {option: value})
