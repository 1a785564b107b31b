"""The suite's time budget (a pytest plugin for the whole repository): the summary lists the slowest tests and each
plugin's total, and the run fails when one plugin's tests take more than PLUGIN_BUDGET_S seconds (measured on the
2-core CI machine: each plugin takes 1-3 s today), so the suite stays fast as plugins multiply; and torch's
threads shared out among pytest-xdist workers. Works under pytest-xdist (the workers' reports reach the
controller)."""

from __future__ import annotations

import os
import sys
from collections import defaultdict

PLUGIN_BUDGET_S = 20.0
SLOWEST = 8

_durations: dict[str, float] = defaultdict(float)


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n auto``) each worker gets its share of the cores for torch's threads:
    with every worker using all of them, the suite took 184 s on 2 cores instead of 59 s."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        if "torch" in sys.modules:  # already imported by a plugin of pytest's: the variable came too late
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_runtest_logreport(report):
    _durations[report.nodeid] += report.duration  # setup, call and teardown


def _plugin_totals() -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for nodeid, seconds in _durations.items():
        parts = nodeid.split("/")
        if parts[0] == "plugins" and len(parts) > 2:
            totals[parts[1]] += seconds
    return totals


def pytest_terminal_summary(terminalreporter):
    if not _durations:
        return
    write = terminalreporter.write_line
    terminalreporter.section("time budget")
    write(f"{sum(_durations.values()):.1f} s of test time; slowest:")
    for nodeid, seconds in sorted(_durations.items(), key=lambda item: -item[1])[:SLOWEST]:
        write(f"  {seconds:6.2f} s  {nodeid}")
    totals = _plugin_totals()
    if totals:
        write("per plugin: " + ", ".join(f"{p} {s:.1f} s" for p, s in sorted(totals.items(), key=lambda i: -i[1])))
    for plugin, seconds in sorted(totals.items()):
        if seconds > PLUGIN_BUDGET_S:
            write(f"plugins/{plugin}: its tests take {seconds:.1f} s, over the {PLUGIN_BUDGET_S:.0f} s budget: make the "
                  "slow ones smaller (fewer steps, a smaller batch) or share one trained model across tests", red=True)


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and any(s > PLUGIN_BUDGET_S for s in _plugin_totals().values()):
        session.exitstatus = 1
