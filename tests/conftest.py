"""Test-wide setup: skip `gpu` tests without CUDA; run Triton kernels in the interpreter on CPU; under CI, a skip
for any other reason (a missing tool, package or file) fails the test, since CI installs everything itself and a
skip there would hide a broken install step."""

from __future__ import annotations

import os

import pytest

_CUDA = pytest.StashKey[bool]()  # whether CUDA is usable, decided once per session
# The only skips CI accepts: the machine has no GPU (or fewer than a test needs).
_HARDWARE_SKIP_WORDS = ("CUDA", "GPU")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    # Runs before any test module is imported, so Triton sees this when it first loads.
    config.stash[_CUDA] = _cuda_available()
    if not config.stash[_CUDA]:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.stash[_CUDA]:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def is_hardware_skip(reason: str) -> bool:
    return any(word in reason for word in _HARDWARE_SKIP_WORDS)


def under_ci() -> bool:
    """CI=true (as CI services and .ci/run set it); CI=false or 0 is not CI."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _fail_tool_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under CI, turn a skip that is not about GPU hardware into a failure naming the skip's reason."""
    if not under_ci() or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if not is_hardware_skip(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI ({reason}): CI installs every tool and file the suite needs"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_tool_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module-level skip (``pytest.importorskip`` or ``pytest.skip(allow_module_level=True)``) is a collection
    report, not a test's: without this it skipped a whole file under CI unnoticed."""
    outcome = yield
    _fail_tool_skip(outcome.get_result())
