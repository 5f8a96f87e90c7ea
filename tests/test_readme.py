"""What README.md and `make bench` tell users must hold: the files they name exist, the examples work as written."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_names_no_file_outside_the_repository():
    assert "shared/" not in README  # the steering repo's notes are not shipped: the architecture is in docs/
    assert "docs/ARCHITECTURE.md" in README and (ROOT / "docs" / "ARCHITECTURE.md").exists()


def test_every_file_the_readme_names_exists():
    named = set(re.findall(r"`((?:[\w.-]+/)+[\w.-]+\.(?:md|py|proto|yml|yaml))`", README))
    named |= set(re.findall(r"\b((?:benchmarks|docs|deploy)/[\w./-]+\.(?:md|py))\b", README))
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, missing


def test_the_streaming_curl_example_ends_with_a_newline():
    lines = [line for line in README.splitlines() if line.startswith("curl -N ") and '"stream": true' in line]
    assert lines and all(line.rstrip().endswith("; echo") for line in lines), lines


def test_the_ready_and_workers_comments_say_what_they_return():
    curls = [line for line in README.splitlines() if line.startswith("curl ")]
    ready = next(line for line in curls if line.split()[1].endswith("/ready"))
    assert "how many" in ready and "503" in ready
    assert any(line.split()[1].endswith("/workers") for line in curls)


@pytest.mark.skipif(shutil.which("make") is None, reason="make not found")
def test_make_bench_names_only_files_that_exist():
    out = subprocess.run(["make", "-s", "bench"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    paths = re.findall(r"\b(benchmarks/[\w./-]+\.(?:md|py))\b", out)
    assert paths and all((ROOT / path).exists() for path in paths), out
    assert "not exist" not in out
