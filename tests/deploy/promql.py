"""What the deploy tests share: the dashboards' and rules' queries, the metric names the code exports, PromQL bits."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from common.engine.stats import EngineStats, FinishedRequest
from common.metrics import RouterMetrics, WorkerMetrics
from services.planner.metrics import PlannerMetrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "deploy" / "grafana" / "dashboards"
RULES_FILE = REPO / "deploy" / "prometheus" / "rules" / "tandem-rules.yml"
RULE_TESTS_DIR = REPO / "deploy" / "prometheus" / "tests"
LOCAL_CONFIG = REPO / "deploy" / "prometheus" / "prometheus-local.yml"
METRIC_NAME = re.compile(r"\b(tandem(?:_[a-zA-Z0-9_]+|:[a-zA-Z0-9_:]+))")
COMPARISON = re.compile(r"\s(>=|<=|==|!=|>|<)\s")


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it comes from (for failure messages)."""

    where: str
    expr: str


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def variables(dashboard: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def dashboard_queries() -> list[Query]:
    found = []
    for name, dashboard in dashboards().items():
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                found.append(Query(f"{name} / {panel['title']} / {target['refId']}", target["expr"]))
    return found


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]


def alert_rules() -> list[dict]:
    return [rule for rule in rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in rules() if "record" in rule}


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables replaced by values (longest names first, so $__range never eats $__rate_interval)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(f"${name}", values[name])
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric and recording-rule names (``tandem_...``, ``tandem:...``) an expression reads."""
    return set(METRIC_NAME.findall(expr))


def alert_signals(expr: str) -> list[str]:
    """The measured parts of an alert: its ``and``/``or``/``unless`` operands with their threshold comparison cut off.

    ``a > 0.1 and b > 0.2`` -> ``[a, b]``. The thresholds make a healthy system return nothing, so the scrape test
    checks that each signal returns data instead.
    """
    return [
        _without_threshold(part) for part in _split_top_level(" ".join(expr.split()), (" and ", " or ", " unless "))
    ]


def _split_top_level(expr: str, words: tuple[str, ...]) -> list[str]:
    parts, depth, start, index = [], 0, 0, 0
    while index < len(expr):
        char = expr[index]
        depth += char in "([{"
        depth -= char in ")]}"
        word = next((w for w in words if depth == 0 and expr.startswith(w, index)), None)
        if word:
            parts.append(expr[start:index].strip())
            start = index = index + len(word)
            continue
        index += 1
    return [*parts, expr[start:].strip()]


def _without_threshold(part: str) -> str:
    """``x > (14.4 * 0.01)`` -> ``x``: cut at the last comparison outside brackets whose right side names no metric."""
    depth, cut = 0, None
    for index, char in enumerate(part):
        depth += char in "([{"
        depth -= char in ")]}"
        match = COMPARISON.match(part, index) if depth == 0 else None
        if match and not metric_names(part[match.end() :]):
            cut = index
    return part if cut is None else part[:cut].strip()


def exported_metric_names() -> set[str]:
    """Every series name the router, the workers and the planner expose (histogram/counter suffixes included), from
    real objects."""
    router = RouterMetrics.create("m")
    names = _sample_names(router.registry) | _sample_names(PlannerMetrics("m").registry)
    for role in ("prefill", "decode"):
        worker = WorkerMetrics("m", role)
        worker.update(EngineStats(10, 5, 1, 1, 2), [FinishedRequest("stop", 0.1, 0.2, 0.3, 5, 3)])
        names |= _sample_names(worker.registry)
    return names


def _sample_names(registry: CollectorRegistry) -> set[str]:
    return {sample.name for family in registry.collect() for sample in family.samples}
