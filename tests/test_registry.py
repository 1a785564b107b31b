"""The registry: built-ins through the same hook as plugins, unknown and broken plugins, duplicates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from trl_plus import Method, Needs, Paper, TrlPlusError, hookimpl
from trl_plus import registry as registry_module
from trl_plus.registry import get_registry, load_registry
from trl_plus.testing import registered


class FakeEntryPoint:
    def __init__(self, name, load):
        self.name, self._load = name, load
        self.dist = SimpleNamespace(name=f"trl-plus-{name}")

    def load(self):
        return self._load()


class Good(Method):
    name = "good-method"
    paper = Paper("Good", "1234.5678")
    needs = Needs(reference="no")


class GoodPlugin:
    @hookimpl
    def register_methods(self, register):
        register(Good)


def good_plugin():
    return GoodPlugin()


def broken_plugin():
    raise ImportError("No module named 'flash_attn'")


@pytest.fixture
def fake_entry_points(monkeypatch):
    def install(*eps):
        monkeypatch.setattr(registry_module, "_selected_entry_points", lambda: list(eps))
        return load_registry()

    return install


def test_builtin_dpo_comes_through_the_public_hook():
    registry = get_registry()
    assert registry.sources["dpo"] == "trl-plus (built-in)"
    assert registry.plugin_manager.get_plugin("trl-plus") is not None
    assert "tiny-llama" in registry.aliases


def test_a_broken_plugin_is_reported_and_never_hides_the_others(fake_entry_points):
    registry = fake_entry_points(FakeEntryPoint("bad", broken_plugin), FakeEntryPoint("good", good_plugin))
    assert "good-method" in registry.methods and "dpo" in registry.methods
    assert registry.broken["bad"].error == "ImportError: No module named 'flash_attn'"
    with pytest.raises(TrlPlusError, match=r"'bad' is installed \(trl-plus-bad \(bad\)\) but its plugin failed to "
                                           r"import: ImportError: No module named 'flash_attn'"):  # fmt: skip
        registry.get("bad")


def test_unknown_method_error_lists_nearest_names():
    with pytest.raises(TrlPlusError, match=r"unknown method 'dop' \(did you mean dpo\b"):
        get_registry().get("dop")


def test_duplicate_names_fail_loudly():
    class Clash(Good):
        name = "dpo"

    with pytest.raises(TrlPlusError, match="'dpo' is registered twice: by trl-plus \\(built-in\\) and by clash"):
        with registered(Clash, name="clash"):
            pass
    assert get_registry().sources["dpo"] == "trl-plus (built-in)"


def test_registered_context_adds_and_removes():
    with registered(Good):
        assert get_registry().get("good-method") is Good
    assert "good-method" not in get_registry().methods


def test_env_var_restricts_entry_points(monkeypatch):
    monkeypatch.setenv("TRL_PLUS_PLUGINS", "")
    assert registry_module._selected_entry_points() == []
