"""Builds the Grafana dashboards in deploy/grafana/dashboards/ (the JSON there is generated: edit this file).

    .venv/bin/python deploy/grafana/build_dashboards.py          # rewrite the JSON files
    .venv/bin/python deploy/grafana/build_dashboards.py --check  # exit 1 if they are out of date (CI runs this)

Every dashboard takes a Prometheus ``datasource`` variable and ``namespace`` / ``model`` variables ("All" matches
series without the label too, as a local Prometheus scrape has no ``namespace``). The SLO overview adds SLO
thresholds as variables whose options are the goodput grid of common/metrics.py (each also a histogram bucket
bound, so percentiles, `le` shares and goodput agree). Queries use ``$__rate_interval`` for time series and
``$__range`` for the single-number panels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'model=~"$model", namespace=~"$namespace"'
RATE = "$__rate_interval"
# Options of the SLO variables: the goodput grid (SLO_TTFT_GRID, SLO_TPOT_GRID) and LATENCY_BUCKETS bounds for E2E,
# written as Prometheus writes `le` values. tests/deploy/test_dashboards.py checks them against common/metrics.py.
TTFT_SLO_OPTIONS = ("0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf")
TPOT_SLO_OPTIONS = ("0.01", "0.02", "0.03", "0.05", "0.075", "0.1", "0.2", "0.5", "+Inf")
E2E_SLO_OPTIONS = ("1.0", "2.5", "5.0", "10.0", "30.0", "60.0", "120.0", "300.0")
QUANTILES = ((0.5, "p50"), (0.95, "p95"), (0.99, "p99"))


# ---------------------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat
    description: str = ""
    width: int = 12
    height: int = 8
    max: float | None = None
    text_mode: str = "auto"  # stat panels: "name" shows the series' legend instead of its value


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    extra_variables: tuple[dict, ...] = field(default_factory=tuple)


def quantile_targets(metric: str, where: str, by: str = "model", label: str = "{{model}}") -> tuple[Target, ...]:
    """p50/p95/p99 of a histogram, one line per ``by`` value."""
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}, {where}}}[{RATE}])))",
            f"{name} {label}",
        )
        for q, name in QUANTILES
    )


def share_within(metric: str, where: str, le: str, window: str) -> str:
    """Fraction of observations at or below the bucket bound ``le``."""
    return (
        f'sum(increase({metric}_bucket{{{SEL}, {where}, le="{le}"}}[{window}])) / '
        f"sum(increase({metric}_count{{{SEL}, {where}}}[{window}]))"
    )


def goodput(window: str) -> str:
    return (
        f'sum(increase(tandem_requests_slo_met_total{{{SEL}, ttft_le="$ttft_slo", tpot_le="$tpot_slo"}}'
        f'[{window}])) / sum(increase(tandem_requests_finished_total{{{SEL}, role="router"}}[{window}]))'
    )


def error_share(window: str) -> str:
    return (
        f'sum(rate(tandem_request_errors_total{{{SEL}, role="router", status=~"5.."}}[{window}])) / '
        f'sum(rate(tandem_requests_total{{{SEL}, role="router"}}[{window}]))'
    )


# ---------------------------------------------------------------------------------------------------- dashboards
def slo_overview() -> Dashboard:
    router = 'role="router"'
    stats = Row(
        "Service level over the selected time range",
        (
            Panel(
                "Goodput",
                (Target(goodput("$__range")),),
                "percentunit",
                "stat",
                "Share of requests that finished normally with TTFT <= $ttft_slo s and TPOT <= $tpot_slo s "
                "(errors and aborted requests count as misses)",
                4,
                5,
            ),
            Panel(
                "Within TTFT SLO",
                (Target(share_within("tandem_time_to_first_token_seconds", router, "$ttft_slo", "$__range")),),
                "percentunit",
                "stat",
                "Share of requests whose first token came within $ttft_slo s",
                4,
                5,
            ),
            Panel(
                "Within TPOT SLO",
                (Target(share_within("tandem_time_per_output_token_seconds", router, "$tpot_slo", "$__range")),),
                "percentunit",
                "stat",
                "Share of requests streaming at most $tpot_slo s per output token",
                4,
                5,
            ),
            Panel(
                "Within E2E SLO",
                (Target(share_within("tandem_e2e_request_latency_seconds", router, "$e2e_slo", "$__range")),),
                "percentunit",
                "stat",
                "Share of requests finished within $e2e_slo s",
                4,
                5,
            ),
            Panel(
                "Request rate",
                (Target(f"sum(rate(tandem_requests_total{{{SEL}, {router}}}[$__range]))"),),
                "reqps",
                "stat",
                "Requests received by the OpenAI API",
                4,
                5,
            ),
            Panel(
                "5xx error rate",
                (Target(error_share("$__range")),),
                "percentunit",
                "stat",
                "Share of requests answered with a server error",
                4,
                5,
            ),
        ),
    )
    latency = Row(
        "Latency percentiles against the SLO",
        (
            Panel(
                "Time to first token",
                (*quantile_targets("tandem_time_to_first_token_seconds", router), Target("vector($ttft_slo)", "SLO")),
                "s",
                description="At the router, from request arrival to the first token",
            ),
            Panel(
                "Time per output token",
                (*quantile_targets("tandem_time_per_output_token_seconds", router), Target("vector($tpot_slo)", "SLO")),
                "s",
                description="Per request: (end - first token) / (output tokens - 1), at the router",
            ),
            Panel(
                "Inter-token latency",
                (
                    *quantile_targets("tandem_inter_token_latency_seconds", router),
                    Target("vector($tpot_slo)", "TPOT SLO"),
                ),
                "s",
                description="Time between streamed tokens, at the router",
            ),
            Panel(
                "End-to-end latency",
                (*quantile_targets("tandem_e2e_request_latency_seconds", router), Target("vector($e2e_slo)", "SLO")),
                "s",
                description="Request arrival to last token, requests that finished normally",
            ),
        ),
    )
    traffic = Row(
        "Goodput, traffic and errors",
        (
            Panel(
                "Goodput",
                (
                    Target(goodput(RATE), "both SLOs"),
                    Target(share_within("tandem_time_to_first_token_seconds", router, "$ttft_slo", RATE), "TTFT SLO"),
                    Target(share_within("tandem_time_per_output_token_seconds", router, "$tpot_slo", RATE), "TPOT SLO"),
                ),
                "percentunit",
                description="Share of requests meeting the SLOs",
                max=1,
            ),
            Panel(
                "Requests",
                (
                    Target(
                        f"sum by (endpoint) (rate(tandem_requests_total{{{SEL}, {router}}}[{RATE}]))",
                        "received {{endpoint}}",
                    ),
                    Target(
                        f"sum by (finish_reason) (rate(tandem_requests_finished_total{{{SEL}, {router}}}[{RATE}]))",
                        "finished {{finish_reason}}",
                    ),
                ),
                "reqps",
            ),
            Panel(
                "Errors by status",
                (
                    Target(
                        f"sum by (status) (rate(tandem_request_errors_total{{{SEL}, {router}}}[{RATE}]))", "{{status}}"
                    ),
                ),
                "reqps",
                description="Requests answered with an HTTP error, before or during the stream",
            ),
            Panel(
                "Error rate",
                (Target(error_share(RATE), "5xx share"),),
                "percentunit",
                description="Server errors / requests received",
            ),
            Panel(
                "Tokens",
                (
                    Target(f"sum(rate(tandem_prompt_tokens_total{{{SEL}, {router}}}[{RATE}]))", "prompt"),
                    Target(f"sum(rate(tandem_generation_tokens_total{{{SEL}, {router}}}[{RATE}]))", "generated"),
                ),
                "suffix: tok/s",
            ),
            Panel(
                "Router",
                (
                    Target(f"sum(tandem_requests_running{{{SEL}, {router}}})", "running"),
                    Target(f"sum(tandem_requests_waiting{{{SEL}, {router}}})", "waiting for admission"),
                ),
                "short",
                description="Requests streaming and queued at the routers",
            ),
            Panel(
                "Router queue and overhead",
                (
                    Target(
                        f"histogram_quantile(0.99, sum by (le) (rate(tandem_request_queue_time_seconds_bucket"
                        f"{{{SEL}, {router}}}[{RATE}])))",
                        "admission wait p99",
                    ),
                    Target(
                        f"histogram_quantile(0.99, sum by (le) (rate(tandem_router_added_latency_seconds_bucket"
                        f"{{{SEL}, {router}}}[{RATE}])))",
                        "router added latency p99",
                    ),
                ),
                "s",
            ),
            Panel(
                "Retries and migrations",
                (
                    Target(
                        f"sum by (reason) (rate(tandem_router_retries_total{{{SEL}}}[{RATE}]))", "retry: {{reason}}"
                    ),
                    Target(f"sum(rate(tandem_router_migrations_total{{{SEL}}}[{RATE}]))", "migrations"),
                ),
                "ops",
            ),
        ),
    )
    return Dashboard(
        "tandem-slo",
        "Tandem / SLO overview",
        "User-facing latency against SLOs, goodput, traffic and errors (measured at the routers), and the planner",
        (stats, latency, traffic, planner_row()),
        slo_variables(),
    )


def planner_row() -> Row:
    """What `tandem planner` wants and why (its own metrics), next to what the routers observe."""

    def predicted_vs_observed(name: str, histogram: str) -> tuple[Target, ...]:
        return (
            Target(f"max(tandem_planner_predicted_{name}_seconds{{{SEL}}})", "predicted at desired replicas"),
            Target(f"max(tandem_planner_observed_{name}_p90_seconds{{{SEL}}})", "p90 the planner observed"),
            Target(
                f'histogram_quantile(0.9, sum by (le) (rate({histogram}_bucket{{{SEL}, role="router"}}[{RATE}])))',
                "p90 at the routers",
            ),
        )

    return Row(
        "Planner",
        (
            Panel(
                "Desired vs actual replicas",
                (
                    Target(f"max by (pool) (tandem_planner_desired_replicas{{{SEL}}})", "desired {{pool}}"),
                    Target(f"max by (pool) (tandem_planner_actual_replicas{{{SEL}}})", "available {{pool}}"),
                    Target(f"max by (pool) (tandem_planner_unplaceable_replicas{{{SEL}}})", "unplaceable {{pool}}"),
                ),
                "short",
                description="Replicas the planner wants per pool, those available, and those the cluster has not "
                "placed for longer than the planner's bound (TandemPlannerCannotPlace fires after 10 minutes)",
            ),
            Panel(
                "Planner decisions",
                (
                    Target(
                        f"sum by (pool, direction) (increase(tandem_planner_decisions_total{{{SEL}}}[{RATE}]))",
                        "{{pool}} {{direction}}",
                    ),
                ),
                "short",
                description="Decisions per pool by direction (up | down | hold), one per planner interval",
            ),
            Panel(
                "Predicted vs observed TTFT",
                predicted_vs_observed("ttft", "tandem_time_to_first_token_seconds"),
                "s",
                description="The profile's TTFT at the desired prefill replicas against the observed p90",
                width=8,
            ),
            Panel(
                "Predicted vs observed TPOT",
                predicted_vs_observed("tpot", "tandem_time_per_output_token_seconds"),
                "s",
                description="The profile's TPOT at the desired decode replicas against the observed p90",
                width=8,
            ),
            Panel(
                "Correction factor",
                (
                    Target(f"max by (pool) (tandem_planner_correction_factor{{{SEL}}})", "{{pool}}"),
                ),
                "short",
                description="Per pool, observed / predicted latency (TTFT for prefill, TPOT for decode), smoothed "
                "and clamped: the planner multiplies the profile's predictions by it, so above 1 the pool scales "
                "earlier than its profile and below 1 later (1: none, or --no-correction). Decisions it drove show "
                "as up_correction in the last decision",
                width=8,
            ),
            Panel(
                "Last planner decision",
                (
                    Target(
                        f"max by (pool, kind) (tandem_planner_last_decision_reason{{{SEL}}}) == 1",
                        "{{pool}}: {{kind}}",
                    ),
                ),
                "short",
                "stat",
                "The kind of each pool's last decision's reason (clamped | up | up_correction: the correction "
                "factor asked for more than the profile | up_queue: the prefill queue kept growing | hold | "
                "hold_observed | hold_cooldown | down); the planner's log has the full reason",
                width=24,
                text_mode="name",
            ),
        ),
    )


def pools() -> Dashboard:
    workers = 'role=~"prefill|decode"'
    load = Row(
        "Replicas and load",
        (
            Panel(
                "Workers by pool",
                (Target(f"max by (role) (tandem_workers{{{SEL}}})", "{{role}}"),),
                "short",
                description="Live workers as the routers see them in the registry",
                width=8,
            ),
            Panel(
                "Running by pool",
                (Target(f"sum by (role) (tandem_requests_running{{{SEL}}})", "{{role}}"),),
                "short",
                description="Requests in the engines' running batches (router: streaming)",
                width=8,
            ),
            Panel(
                "Waiting by pool",
                (Target(f"sum by (role) (tandem_requests_waiting{{{SEL}}})", "{{role}}"),),
                "short",
                description="Requests in the engines' waiting queues (router: admission queue)",
                width=8,
            ),
        ),
    )
    kv = Row(
        "KV cache",
        (
            Panel(
                "KV-cache usage per worker",
                (Target(f"tandem_kv_cache_usage_ratio{{{SEL}}}", "{{role}} {{instance}}"),),
                "percentunit",
                description="Blocks held by requests or reservations",
                width=8,
                max=1,
            ),
            Panel(
                "Free KV blocks per worker",
                (Target(f"tandem_kv_cache_free_blocks{{{SEL}}}", "{{role}} {{instance}}"),),
                "short",
                width=8,
            ),
            Panel(
                "Open KV reservations",
                (Target(f'sum by (instance) (tandem_kv_reservations{{{SEL}, role="decode"}})', "{{instance}}"),),
                "short",
                description="Decode blocks reserved for KV still in flight from prefill",
                width=8,
            ),
        ),
    )
    throughput = Row(
        "Throughput",
        (
            Panel(
                "Prefill tokens/s",
                (Target(f"sum by (role) (rate(tandem_prefill_tokens_total{{{SEL}, {workers}}}[{RATE}]))", "{{role}}"),),
                "suffix: tok/s",
                description="Tokens computed by prefill (prefix-cache hits excluded); decode workers prefill short "
                "prompts themselves",
            ),
            Panel(
                "Decode tokens/s",
                (
                    Target(
                        f'sum by (role) (rate(tandem_generation_tokens_total{{{SEL}, role="decode"}}[{RATE}]))',
                        "sampled by {{role}}",
                    ),
                    Target(
                        f'sum(rate(tandem_generation_tokens_total{{{SEL}, role="router"}}[{RATE}]))',
                        "delivered by routers",
                    ),
                ),
                "suffix: tok/s",
            ),
            Panel(
                "Prefix-cache hit rate",
                (
                    Target(
                        f"sum by (role) (rate(tandem_prefix_cache_hits_total{{{SEL}}}[{RATE}]))"
                        f" / sum by (role) (rate(tandem_prefix_cache_queries_total{{{SEL}}}"
                        f"[{RATE}]))",
                        "{{role}}",
                    ),
                ),
                "percentunit",
                max=1,
            ),
            Panel(
                "Preemptions",
                (Target(f"sum by (role) (rate(tandem_preemptions_total{{{SEL}}}[{RATE}]))", "{{role}}"),),
                "ops",
                description="Requests freed and recomputed later for lack of KV blocks",
            ),
        ),
    )
    phases = Row(
        "Worker phases",
        (
            Panel(
                "Engine queue time",
                quantile_targets("tandem_request_queue_time_seconds", workers, "role", "{{role}}"),
                "s",
                width=8,
            ),
            Panel(
                "Prefill time",
                quantile_targets("tandem_request_prefill_time_seconds", workers, "role", "{{role}}"),
                "s",
                description="First scheduled to first token sampled on that worker",
                width=8,
            ),
            Panel(
                "Decode time",
                quantile_targets("tandem_request_decode_time_seconds", 'role="decode"', "role", "{{role}}"),
                "s",
                width=8,
            ),
            Panel(
                "Finished by reason",
                (
                    Target(
                        f"sum by (role, finish_reason) (rate(tandem_requests_finished_total{{{SEL}}}[{RATE}]))",
                        "{{role}} {{finish_reason}}",
                    ),
                ),
                "reqps",
                width=24,
            ),
        ),
    )
    return Dashboard(
        "tandem-pools",
        "Tandem / Pools",
        "Prefill vs decode pools: replicas, load, KV cache, throughput",
        (load, kv, throughput, speculation_row(), phases),
    )


def speculation_row() -> Row:
    """Speculative decoding on the decode pool (prefill workers never speculate). A "draft" is one sequence's
    verification in one step; the ratios read NaN (no data) while nothing speculates."""

    def rate(name: str, by: str = "") -> str:
        grouping = f" by ({by})" if by else ""
        return f'sum{grouping} (rate(tandem_spec_decode_num_{name}_total{{{SEL}, role="decode"}}[{RATE}]))'

    return Row(
        "Speculative decoding",
        (
            Panel(
                "Draft acceptance rate",
                (Target(f"{rate('accepted_tokens')} / {rate('draft_tokens')}", "accepted / proposed"),),
                "percentunit",
                description="Share of the proposed draft tokens that the target model accepted",
                width=6,
                max=1,
            ),
            Panel(
                "Tokens per verification",
                (
                    Target(f"{rate('accepted_tokens')} / {rate('drafts')}", "accepted"),
                    Target(f"{rate('emitted_tokens')} / {rate('drafts')}", "emitted"),
                ),
                "short",
                description="Mean accepted draft length per verification, and the tokens each emitted (accepted "
                "plus the target's own): a step's speed-up over plain decoding is at most the emitted count",
                width=6,
            ),
            Panel(
                "Acceptance by draft position",
                (
                    Target(
                        f"{rate('accepted_tokens_per_pos', 'position')} / ignoring (position) group_left "
                        f"{rate('drafts')}",
                        "position {{position}}",
                    ),
                ),
                "percentunit",
                description="Share of verifications whose draft token at that position (0-based) was accepted",
                width=6,
                max=1,
            ),
            Panel(
                "Draft tokens/s",
                (
                    Target(rate("draft_tokens"), "proposed"),
                    Target(rate("accepted_tokens"), "accepted"),
                ),
                "suffix: tok/s",
                width=6,
            ),
        ),
    )


def transfer() -> Dashboard:
    totals = Row(
        "Over the selected time range",
        (
            Panel(
                "KV bytes sent",
                (Target(f'sum(increase(tandem_kv_transfer_bytes_total{{{SEL}, role="prefill"}}[$__range]))'),),
                "bytes",
                "stat",
                width=6,
                height=5,
            ),
            Panel(
                "Transfers",
                (
                    Target(
                        f'sum(increase(tandem_kv_transfer_duration_seconds_count{{{SEL}, role="prefill"}}[$__range]))'
                    ),
                ),
                "short",
                "stat",
                width=6,
                height=5,
            ),
            Panel(
                "Failed transfers",
                (Target(f'sum(increase(tandem_kv_transfer_failures_total{{{SEL}, role="prefill"}}[$__range]))'),),
                "short",
                "stat",
                width=6,
                height=5,
            ),
            Panel(
                "Checksum mismatches",
                (Target(f"sum(increase(tandem_kv_transfer_checksum_mismatches_total{{{SEL}}}[$__range]))"),),
                "short",
                "stat",
                width=6,
                height=5,
            ),
        ),
    )
    speed = Row(
        "Bandwidth and latency",
        (
            Panel(
                "KV transfer bandwidth",
                (
                    Target(
                        f"sum by (role, transport) (rate(tandem_kv_transfer_bytes_total{{{SEL}}}[{RATE}]))",
                        "{{role}} {{transport}}",
                    ),
                ),
                "Bps",
                description="prefill: bytes sent and acknowledged; decode: bytes received and verified",
            ),
            Panel(
                "Transfers/s",
                (
                    Target(
                        f"sum by (role, transport) (rate(tandem_kv_transfer_duration_seconds_count{{{SEL}}}[{RATE}]))",
                        "{{role}} {{transport}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Transfer latency",
                quantile_targets("tandem_kv_transfer_duration_seconds", 'role=~"prefill|decode"', "role", "{{role}}"),
                "s",
                description="prefill: send until acknowledged; decode: receive, verify and import",
            ),
            Panel(
                "Mean KV bytes per transfer",
                (
                    Target(
                        f"sum by (transport) (rate(tandem_kv_transfer_bytes_total{{{SEL}, "
                        f'role="prefill"}}[{RATE}])) / sum by (transport) (rate('
                        f"tandem_kv_transfer_duration_seconds_count{{{SEL}, "
                        f'role="prefill"}}[{RATE}]))',
                        "{{transport}}",
                    ),
                ),
                "bytes",
            ),
        ),
    )
    failures = Row(
        "Failures",
        (
            Panel(
                "Failed transfers/s",
                (
                    Target(
                        f"sum by (role, transport) (rate(tandem_kv_transfer_failures_total{{{SEL}}}[{RATE}]))",
                        "{{role}} {{transport}}",
                    ),
                ),
                "ops",
                width=8,
            ),
            Panel(
                "Checksum mismatches/s",
                (
                    Target(
                        f"sum by (transport) (rate(tandem_kv_transfer_checksum_mismatches_total{{{SEL}}}[{RATE}]))",
                        "{{transport}}",
                    ),
                ),
                "ops",
                width=8,
            ),
            Panel(
                "Failure ratio and re-prefills",
                (
                    Target(
                        f'sum(rate(tandem_kv_transfer_failures_total{{{SEL}, role="prefill"}}[{RATE}])) / '
                        f'sum(rate(tandem_kv_transfer_duration_seconds_count{{{SEL}, role="prefill"}}[{RATE}]))',
                        "failed share",
                    ),
                    Target(
                        f'sum(rate(tandem_router_retries_total{{{SEL}, reason="kv_transfer_failed"}}[{RATE}]))',
                        "router re-prefills/s",
                    ),
                ),
                "short",
                width=8,
            ),
        ),
    )
    return Dashboard(
        "tandem-transfer",
        "Tandem / KV transfer",
        "KV-cache transfers from prefill to decode workers: bandwidth, latency, failures",
        (totals, speed, failures),
    )


DASHBOARDS = {"tandem-slo.json": slo_overview, "tandem-pools.json": pools, "tandem-transfer.json": transfer}


# ---------------------------------------------------------------------------------------------------- JSON
def render(dashboard: Dashboard) -> dict:
    """The Grafana dashboard JSON model (schema 39) of ``dashboard``."""
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["tandem"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["tandem"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "title": "Tandem",
            }
        ],
        "templating": {"list": [*_base_variables(), *dashboard.extra_variables]},
        "panels": list(_layout(dashboard.rows)),
    }


def _layout(rows: Iterable[Row]) -> Iterable[dict]:
    ids, y = iter(range(1, 1000)), 0
    for row in rows:
        yield {
            "type": "row",
            "id": next(ids),
            "title": row.title,
            "collapsed": False,
            "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
        }
        y, x, line_height = y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > 24:
                y, x, line_height = y + line_height, 0, 0
            yield _panel(panel, next(ids), {"h": panel.height, "w": panel.width, "x": x, "y": y})
            x, line_height = x + panel.width, max(line_height, panel.height)
        y += line_height


def _panel(panel: Panel, panel_id: int, grid: dict) -> dict:
    defaults: dict = {"unit": panel.unit}
    if panel.max is not None:
        defaults.update(min=0, max=panel.max)
    body = {
        "type": panel.kind,
        "id": panel_id,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": t.expr,
                "legendFormat": t.legend,
                "refId": chr(65 + i),
                "range": True,
                "instant": False,
            }
            for i, t in enumerate(panel.targets)
        ],
    }
    if panel.kind == "stat":
        body["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "textMode": panel.text_mode,
        }
    else:
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": True,
        }
        body["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return body


def _base_variables() -> list[dict]:
    namespace = _query_variable("namespace", "Namespace", "label_values(tandem_requests_running, namespace)")
    model = _query_variable("model", "Model", 'label_values(tandem_requests_running{namespace=~"$namespace"}, model)')
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
    }
    return [datasource, namespace, model]


def _query_variable(name: str, label: str, query: str) -> dict:
    """A multi-select label variable whose "All" is ``.*``, so it also matches series without the label."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "sort": 1,
        "regex": "",
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "hide": 0,
        "options": [],
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def _custom_variable(name: str, label: str, options: tuple[str, ...], default: str, description: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "custom",
        "description": description,
        "query": ",".join(options),
        "includeAll": False,
        "multi": False,
        "hide": 0,
        "current": {"selected": True, "text": default, "value": default},
        "options": [{"selected": option == default, "text": option, "value": option} for option in options],
    }


def slo_variables() -> tuple[dict, ...]:
    return (
        _custom_variable(
            "ttft_slo",
            "TTFT SLO (s)",
            TTFT_SLO_OPTIONS,
            "2.5",
            "Time-to-first-token threshold; options are the router's goodput grid",
        ),
        _custom_variable(
            "tpot_slo",
            "TPOT SLO (s)",
            TPOT_SLO_OPTIONS,
            "0.1",
            "Time-per-output-token threshold; options are the router's goodput grid",
        ),
        _custom_variable(
            "e2e_slo", "E2E SLO (s)", E2E_SLO_OPTIONS, "30.0", "End-to-end latency threshold (histogram bucket bounds)"
        ),
    )


def build() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(render(make()), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON files differ from what this builds")
    args = parser.parse_args(argv)
    stale = [
        name for name, text in build().items() if not (OUT_DIR / name).exists() or (OUT_DIR / name).read_text() != text
    ]
    if args.check:
        for name in stale:
            print(f"{OUT_DIR / name} is out of date: run {Path(__file__).name}", file=sys.stderr)
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in build().items():
        (OUT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
