"""Renders helm/tandem with the real `helm` binary and indexes the objects, for the chart tests.

helm is looked up beside the running Python (`make ops-tools` installs it into .venv/bin), then on PATH;
tests that need it skip when it is absent.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tandem"
EXAMPLES = REPO / "deploy" / "examples"
RELEASE = "demo"
NAMESPACE = "llm"
# Optional APIs a real cluster may serve; templates gate on them, so renders pass them to see those objects.
OPTIONAL_APIS = ("monitoring.coreos.com/v1", "keda.sh/v1alpha1")
WORKERS = ("prefill", "decode")
COMPONENTS = ("router", *WORKERS)


def helm_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "helm"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("helm")


def require_helm() -> str:
    helm = helm_binary()
    if helm is None:
        pytest.skip(f"helm not found beside {sys.executable} nor on PATH: run `make ops-tools` to install it")
    return helm


def run_helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    """`helm <args...>` on `chart` (the chart path goes where {chart} stands in args, else last)."""
    argv = [require_helm(), *(str(chart) if a == "{chart}" else a for a in args)]
    if "{chart}" not in args:
        argv.append(str(chart))
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@dataclass(frozen=True)
class Render:
    """The objects of one `helm template`, with lookups by kind and name."""

    objects: tuple[dict[str, Any], ...]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}: {self.names(kind)}"
        return found[0]

    def names(self, kind: str) -> list[str]:
        return [o["metadata"]["name"] for o in self.of_kind(kind)]

    def deployment(self, component: str) -> dict[str, Any]:
        return self.get("Deployment", f"{RELEASE}-tandem-{component}")

    def containers(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(Deployment, container) for every container of every Deployment."""
        for deployment in self.of_kind("Deployment"):
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                yield deployment, container


def template_args(values: Sequence[str], sets: Sequence[str], apis: Sequence[str]) -> list[str]:
    args = ["template", RELEASE, "{chart}", "--namespace", NAMESPACE]
    for path in values:
        args += ["-f", path]
    for item in sets:
        args += ["--set", item]
    for api in apis:
        args += ["--api-versions", api]
    return args


@functools.cache
def render(
    values: tuple[str, ...] = (), sets: tuple[str, ...] = (), apis: tuple[str, ...] = OPTIONAL_APIS, chart: Path = CHART
) -> Render:
    """`helm template` with these values files, --set items and API versions; fails the test if helm does."""
    result = run_helm(*template_args(values, sets, apis), chart=chart)
    if result.returncode != 0:
        pytest.fail(f"helm template failed:\n{result.stderr}")
    return Render(tuple(o for o in yaml.safe_load_all(result.stdout) if o))


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def container_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def port_numbers(container: dict[str, Any]) -> dict[str, int]:
    """Container port name -> number."""
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (number or container port name) as a number; fails on an unknown name."""
    if isinstance(port, int):
        return port
    names = port_numbers(container)
    assert port in names, f"port {port!r} is not a port of container {container['name']}: {names}"
    return names[port]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
