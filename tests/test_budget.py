"""The suite's time budget (the repository's conftest.py) fails a run whose plugin tests are too slow."""

from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]


def test_a_plugin_over_its_budget_fails_the_run_and_is_named(pytester):
    conftest = (ROOT / "conftest.py").read_text().replace("PLUGIN_BUDGET_S = 20.0", "PLUGIN_BUDGET_S = 0.2")
    pytester.makeconftest(conftest)
    pytester.mkdir("plugins")
    for name, seconds in (("slow-po", 0.3), ("fast-po", 0.0)):
        folder = pytester.path / "plugins" / name / "tests"
        folder.mkdir(parents=True)
        (folder / f"test_{name[:4]}.py").write_text(f"import time\n\ndef test_it():\n    time.sleep({seconds})\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "plugins")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*time budget*", "per plugin: slow-po 0.*", "plugins/slow-po: its tests take 0.* s, "
                                 "over the 0 s budget*"])  # fmt: skip
    assert "plugins/fast-po: its tests take" not in result.stdout.str()
