"""Under CI a skip for a missing tool fails the test (or, for a module-level skip, the collection); a skip for
missing GPU hardware stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = '''
import pytest

def test_tool_missing():
    pytest.skip("helm not found: run make ops-tools")

@pytest.mark.skipif(True, reason="needs CUDA: torch.cuda.is_available() is False")
def test_gpu_only():
    pass

def test_fine():
    pass
'''
MODULE_SKIP = '''
import pytest

pytest.importorskip("tandem_no_such_tool_module", reason="promtool not found: run make ops-tools")


def test_never_collected():
    pass
'''
HOOKS = "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"


def run_probe(tmp_path: Path, ci: str | None, probe: str = PROBE) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(HOOKS)
    (tmp_path / "test_probe.py").write_text(probe)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(ROOT)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_a_missing_tool_fails_under_ci(tmp_path):
    proc = run_probe(tmp_path, ci="true")
    assert "1 failed, 1 passed, 1 skipped" in proc.stdout, proc.stdout
    assert "skipped under CI" in proc.stdout and proc.returncode == 1


def test_outside_ci_it_is_a_skip(tmp_path):
    for ci in (None, "false", "0"):
        proc = run_probe(tmp_path, ci=ci)
        assert "1 passed, 2 skipped" in proc.stdout and proc.returncode == 0, (ci, proc.stdout)


def test_a_module_level_skip_for_a_missing_tool_fails_the_run_under_ci(tmp_path):
    proc = run_probe(tmp_path, ci="true", probe=MODULE_SKIP)
    assert proc.returncode != 0 and "skipped under CI" in proc.stdout and "promtool not found" in proc.stdout, \
        proc.stdout
    proc = run_probe(tmp_path, ci=None, probe=MODULE_SKIP)
    assert proc.returncode == 5 and "1 skipped" in proc.stdout, proc.stdout  # 5: no test ran, not a failure


def test_ci_entry_point_sets_ci_true():
    """.ci/run exports CI=true itself, so the mechanism above holds whatever the CI service sets."""
    script = (ROOT / ".ci" / "run").read_text()
    assert "export CI=true" in script
