"""Grafana dashboards: generated JSON up to date, variables, required panels, filters, exported metrics, PromQL."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from common.metrics import LATENCY_BUCKETS, SLO_TPOT_GRID, SLO_TTFT_GRID, label_value
from tests.deploy.promql import (
    DASHBOARD_DIR,
    REPO,
    dashboard_queries,
    dashboards,
    exported_metric_names,
    metric_names,
    panels,
    substitute,
    variables,
)

# What the issue asks each dashboard to show, by panel title.
REQUIRED_PANELS = {
    "tandem-slo.json": {
        "Time to first token",
        "Time per output token",
        "Inter-token latency",
        "End-to-end latency",
        "Goodput",
        "Errors by status",
        "Error rate",
        "Requests",
        "Request rate",
        "Desired vs actual replicas",
        "Predicted vs observed TTFT",
        "Predicted vs observed TPOT",
        "Planner decisions",
        "Last planner decision",
        "Correction factor",
    },
    "tandem-pools.json": {
        "Workers by pool",
        "Running by pool",
        "Waiting by pool",
        "KV-cache usage per worker",
        "Prefill tokens/s",
        "Decode tokens/s",
        "Preemptions",
        "Draft acceptance rate",
        "Tokens per verification",
        "Acceptance by draft position",
    },
    "tandem-transfer.json": {
        "KV transfer bandwidth",
        "Transfer latency",
        "Failed transfers/s",
        "Checksum mismatches/s",
    },
}
SAMPLE_VALUES = {
    "model": ".*",
    "namespace": ".*",
    "ttft_slo": "2.5",
    "tpot_slo": "0.1",
    "e2e_slo": "30.0",
    "__rate_interval": "1m",
    "__range": "1h",
}
SELECTOR = re.compile(r"\b(tandem_[a-z0-9_]+)(\{[^}]*\})?")


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards", REPO / "deploy/grafana/build_dashboards.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_json_files_are_what_the_builder_makes():
    built = load_builder().build()
    assert sorted(built) == sorted(path.name for path in DASHBOARD_DIR.glob("*.json"))
    for name, text in built.items():
        assert (DASHBOARD_DIR / name).read_text() == text, f"{name} is stale: run deploy/grafana/build_dashboards.py"


@pytest.mark.parametrize("name", sorted(REQUIRED_PANELS))
def test_required_panels_exist(name):
    titles = {panel["title"] for panel in panels(dashboards()[name])}
    assert REQUIRED_PANELS[name] <= titles, f"missing {REQUIRED_PANELS[name] - titles}"


def test_the_slo_dashboard_has_a_planner_row_reading_every_planner_metric():
    """Issue 13: desired vs actual replicas per pool, predicted vs observed TTFT / TPOT, decisions, the last reason."""
    from services.planner.metrics import PlannerMetrics

    dashboard = dashboards()["tandem-slo.json"]
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert "Planner" in titles
    row = dashboard["panels"][titles.index("Planner")]
    assert row["type"] == "row"
    following = dashboard["panels"][titles.index("Planner") + 1 :]
    in_row = following[: next((i for i, p in enumerate(following) if p["type"] == "row"), len(following))]
    read = {name for panel in in_row for target in panel["targets"] for name in metric_names(target["expr"])}
    planner = {family.name for family in PlannerMetrics("m").registry.collect()}
    shown = {name.removesuffix("_total") for name in read}
    expected = planner - {"tandem_planner_observed_request_rate", "tandem_planner_observed_prompt_tokens_per_second",
                          "tandem_planner_observed_output_tokens_per_second"}  # inputs: on the rules, not the row
    assert expected <= shown, f"planner metrics not on the row: {expected - shown}"
    assert read <= exported_metric_names()
    by_title = {panel["title"]: panel for panel in in_row}
    assert by_title["Last planner decision"]["options"]["textMode"] == "name"
    assert "{{pool}}" in by_title["Desired vs actual replicas"]["targets"][0]["legendFormat"]


def row_panels(dashboard: dict, title: str) -> list[dict]:
    """The panels under the row titled ``title``, up to the next row."""
    titles = [panel["title"] for panel in dashboard["panels"]]
    assert dashboard["panels"][titles.index(title)]["type"] == "row"
    following = dashboard["panels"][titles.index(title) + 1 :]
    return following[: next((i for i, p in enumerate(following) if p["type"] == "row"), len(following))]


def test_the_pools_dashboard_has_a_speculative_decoding_row_reading_every_speculation_counter():
    in_row = row_panels(dashboards()["tandem-pools.json"], "Speculative decoding")
    read = {name for panel in in_row for target in panel["targets"] for name in metric_names(target["expr"])}
    speculation = {name for name in exported_metric_names() if name.startswith("tandem_spec_decode_")}
    assert len(speculation) == 5 and read == speculation
    exprs = {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in in_row}

    def ratio(expr: str) -> tuple[str, str]:  # (numerator's metric, denominator's metric)
        numerator, denominator = expr.split(" / ")
        return metric_names(numerator).pop(), metric_names(denominator).pop()

    assert ratio(exprs["Draft acceptance rate"][0]) == (
        "tandem_spec_decode_num_accepted_tokens_total", "tandem_spec_decode_num_draft_tokens_total")
    assert [ratio(expr) for expr in exprs["Tokens per verification"]] == [
        ("tandem_spec_decode_num_accepted_tokens_total", "tandem_spec_decode_num_drafts_total"),
        ("tandem_spec_decode_num_emitted_tokens_total", "tandem_spec_decode_num_drafts_total"),
    ]
    by_position = next(panel for panel in in_row if panel["title"] == "Acceptance by draft position")["targets"][0]
    assert "sum by (position)" in by_position["expr"] and "{{position}}" in by_position["legendFormat"]
    assert all('role="decode"' in expr for panel_exprs in exprs.values() for expr in panel_exprs)


def test_templated_by_datasource_namespace_and_model():
    uids = set()
    for name, dashboard in dashboards().items():
        uids.add(dashboard["uid"])
        found = variables(dashboard)
        assert found["datasource"]["type"] == "datasource" and found["datasource"]["query"] == "prometheus", name
        for label in ("namespace", "model"):
            variable = found[label]
            assert variable["includeAll"] and variable["allValue"] == ".*" and variable["multi"], (name, label)
            assert variable["datasource"]["uid"] == "${datasource}"
        for panel in panels(dashboard):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
                assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    assert len(uids) == len(dashboards())


def test_slo_variables_offer_the_goodput_grid():
    found = variables(dashboards()["tandem-slo.json"])
    assert found["ttft_slo"]["query"].split(",") == [label_value(b) for b in SLO_TTFT_GRID]
    assert found["tpot_slo"]["query"].split(",") == [label_value(b) for b in SLO_TPOT_GRID]
    assert set(found["e2e_slo"]["query"].split(",")) <= {label_value(b) for b in LATENCY_BUCKETS}
    for name in ("ttft_slo", "tpot_slo", "e2e_slo"):
        assert found[name]["current"]["value"] in found[name]["query"].split(","), name


def test_every_selector_filters_by_model_and_namespace():
    for query in dashboard_queries():
        for name, matchers in SELECTOR.findall(query.expr):
            assert 'model=~"$model"' in matchers and 'namespace=~"$namespace"' in matchers, (query.where, name)


def test_queries_name_only_exported_metrics():
    exported = exported_metric_names()
    for query in dashboard_queries():
        unknown = metric_names(query.expr) - exported
        assert not unknown, f"{query.where} reads {unknown}, which nothing exports"


def test_panels_tile_the_grid_without_overlap():
    for name, dashboard in dashboards().items():
        taken: set[tuple[int, int]] = set()
        ids = [panel["id"] for panel in panels(dashboard)]
        assert len(ids) == len(set(ids)), name
        for panel in panels(dashboard):
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, (name, panel["title"])
            cells = {
                (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & taken, (name, panel["title"])
            taken |= cells


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not found: install Prometheus (make ops-tools, or apt-get install prometheus)",
)
def test_promtool_parses_every_query(tmp_path):
    """Every query, variables filled in, as a recording rule: promtool rejects any PromQL syntax error."""
    queries = dashboard_queries()
    group = {
        "name": "dashboards",
        "rules": [
            {"record": f"dashboard:query_{i}", "expr": substitute(q.expr, SAMPLE_VALUES)} for i, q in enumerate(queries)
        ],
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
