"""Runs someone else's test suite with a pvkernels patch applied to every instance.

    python -m pytest -p pvkernels.integrations.pytest_plugin --pvkernels-patch vector_quantize tests/

The class-level patch is applied when the session starts and undone when it ends; the stats
(fast calls, fallbacks by reason) are printed at the end, and the session fails if the fast
path was never taken (the suite then says nothing about pvkernels).
"""
from __future__ import annotations

import pytest

from . import PEERS, patch

_state: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("pvkernels")
    group.addoption("--pvkernels-patch", action="append", default=[], choices=PEERS, metavar="NAME",
                    help="apply pvkernels.integrations.patch(NAME) to every instance for the session "
                         f"({', '.join(PEERS)})")


def pytest_sessionstart(session):
    names = session.config.getoption("--pvkernels-patch")
    _state["patches"] = [patch(name) for name in names]


def pytest_sessionfinish(session, exitstatus):
    patches = _state.pop("patches", [])
    for p in patches:
        p.unpatch()
    _state["finished"] = patches
    if patches and any(p.stats["fast"] == 0 for p in patches) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    for p in _state.get("finished", []):
        stats = p.stats
        terminalreporter.section(f"pvkernels patch {p.name!r}")
        terminalreporter.write_line(f"fast calls (pvkernels kernels): {stats['fast']}")
        for reason, count in sorted(stats["fallback"].items(), key=lambda kv: -kv[1]):
            terminalreporter.write_line(f"fallback x{count}: {reason}")
        if stats["fast"] == 0:
            terminalreporter.write_line("FAILED: the fast path was never taken", red=True)
