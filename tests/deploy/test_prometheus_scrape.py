"""A real Prometheus scraping a real local cluster: every dashboard query and alert signal returns data.

Redis, the router, one prefill and one decode worker run as processes on 127.0.0.1 (CPU, the default model);
Prometheus runs with deploy/prometheus/prometheus-local.yml (router and planner addresses substituted, 1 s
intervals), so the router's HTTP service discovery of the workers is exercised too. A dry-run `tandem planner`
reads the cluster through the router and serves its metrics. The prefill worker corrupts its first KV transfer
on purpose, so transfer failures, checksum mismatches and the router's re-prefill are real events, not zeros.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from services.cluster import LocalCluster
from services.prefill.service import FAULT_ENV
from tests.deploy.promql import (
    LOCAL_CONFIG,
    RULES_FILE,
    Query,
    alert_rules,
    dashboard_queries,
    dashboards,
    metric_names,
    recorded_names,
    substitute,
    variables,
)
from tests.services.planner.test_decide import PROFILE
from tests.services.test_cluster_e2e import ROUTER_ARGS, WORKER_ARGS
from tests.services.test_cluster_speculation import COUNTING, SPECULATIVE_ARGS

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not found: install it (make ops-tools, or apt-get install prometheus)",
    ),
]

MODEL = "smollm2"
PROMPTS = [
    "Tell me about the river Seine.",
    "Name three primary colors.",
    "What is 7 times 8?",
    "Write a haiku about the sea.",
    "Who wrote Romeo and Juliet?",
    "Say hello in Spanish.",
]
REPEATING_TOKENS = 24  # greedy continues COUNTING's pattern: the n-gram drafts of the decode worker are accepted
NUM_OK = len(PROMPTS) + 1
# Panel queries that may come back empty or without one finite value, and why. Keep it short and explicit.
EXPECTED_EMPTY: dict[str, str] = {
    # The dry-run planner's window is its 1 s interval: after the load, its own p90 has no requests (NaN).
    f"tandem-slo.json / Predicted vs observed {name} / B": "no request in the planner's last 1 s window"
    for name in ("TTFT", "TPOT")
}
# Variable queries that may be empty here: a local Prometheus attaches no Kubernetes `namespace` label.
EXPECTED_EMPTY_VARIABLES = {"namespace": "no Kubernetes namespace label outside Kubernetes"}


@dataclass(frozen=True)
class Stack:
    prometheus: str
    cluster: LocalCluster


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prometheus_config(router_url: str, directory: Path, planner_port: int) -> Path:
    """prometheus-local.yml pointed at this router and planner, scraping and evaluating every second."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES_FILE)]
    text = yaml.safe_dump(config).replace("127.0.0.1:8000", router_url.removeprefix("http://"))
    text = text.replace("127.0.0.1:9500", f"127.0.0.1:{planner_port}")
    text = text.replace("refresh_interval: 5s", "refresh_interval: 1s")
    path = directory / "prometheus.yml"
    path.write_text(text)
    return path


def start_prometheus(config: Path, directory: Path) -> tuple[subprocess.Popen, str]:
    for _ in range(3):  # a free port can be taken between our probe and Prometheus binding it
        url = f"http://127.0.0.1:{free_port()}"
        with open(directory / "prometheus.log", "w") as log:
            command = [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                "--log.level=warn",
            ]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if wait_for(functools.partial(up_or_exited, process, url), 30) and process.poll() is None:
            return process, url
        process.kill()
        process.wait()
    raise AssertionError(f"prometheus did not start: {(directory / 'prometheus.log').read_text()[-2000:]}")


def start_planner(router_url: str, directory: Path) -> tuple[subprocess.Popen, int]:
    """A dry-run planner deciding every second from the router's view of the workers, its metrics on a free port."""
    profile, port = directory / "profile.json", free_port()
    profile.write_text(PROFILE.model_dump_json())
    command = [sys.executable, "-m", "services.launch", "planner", "--dry-run", "--router-url", router_url,
               "--profile", str(profile), "--interval-s", "1", "--metrics-port", str(port), "--model", MODEL]
    with open(directory / "planner.log", "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), port


def up_or_exited(process: subprocess.Popen, url: str) -> bool:
    return process.poll() is not None or ready(url)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(condition, timeout_s: float, every_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every_s)
    return False


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def scalar(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else math.nan


def send_load(router: str) -> None:
    """Streamed chats, plain completions (one that repeats its prompt's pattern), and two client errors (unknown
    model, bad max_tokens)."""

    def chat(prompt: str) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{router}/v1/chat/completions", json=body, timeout=120) as response:
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]", lines[-3:]
        return response.status_code

    def completion(prompt: str, max_tokens: int = 6) -> int:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}
        return httpx.post(f"{router}/v1/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(chat, PROMPTS[:4])) + list(pool.map(completion, PROMPTS[4:]))
    statuses.append(completion(COUNTING, REPEATING_TOKENS))
    assert statuses == [200] * NUM_OK
    assert httpx.post(f"{router}/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert (
        httpx.post(f"{router}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1}).status_code
        == 400
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("prometheus-scrape")
    environ = {**os.environ, FAULT_ENV: "1"}  # the first KV transfer arrives corrupted
    with LocalCluster(
        MODEL,
        1,
        1,
        router_port=0,
        worker_args=[*WORKER_ARGS, *SPECULATIVE_ARGS],  # the decode worker speculates (n-gram drafts)
        router_args=ROUTER_ARGS,
        run_dir=directory / "cluster",
        environ=environ,
    ) as cluster:
        planner, planner_port = start_planner(cluster.router_url, directory)
        process, url = start_prometheus(prometheus_config(cluster.router_url, directory, planner_port), directory)
        try:
            assert wait_for(lambda: scalar(url, "sum(up)") == 4, 30), query(url, "up")
            send_load(cluster.router_url)
            settled = f'sum(tandem_requests_finished_total{{role="router"}}) >= {NUM_OK}'
            assert wait_for(lambda: bool(query(url, settled)), 30), query(url, "tandem_requests_finished_total")
            assert wait_for(lambda: rules_evaluated(url), 30), "rules not evaluated without errors"
            decided = "sum(tandem_planner_decisions_total) > 0"
            assert wait_for(lambda: bool(query(url, decided)), 30), (directory / "planner.log").read_text()[-2000:]
            yield Stack(url, cluster)
        finally:
            process.terminate()
            process.wait(timeout=30)
            planner.terminate()
            planner.wait(timeout=30)


def rules_evaluated(prometheus: str) -> bool:
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return all(rule["health"] == "ok" for group in groups for rule in group["rules"])


def dashboard_values() -> dict[str, str]:
    """The dashboards' variables as a user would leave them: All namespaces and models, default SLOs."""
    values = {"model": ".*", "namespace": ".*", "__rate_interval": "1m", "__range": "5m"}
    for dashboard in dashboards().values():
        for name, variable in variables(dashboard).items():
            if variable["type"] == "custom":
                values[name] = variable["current"]["value"]
    return values


def has_finite_value(result: list[dict]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def test_every_target_is_scraped(stack):
    jobs = {(s["metric"]["job"], s["metric"].get("worker_id", "router")) for s in query(stack.prometheus, "up == 1")}
    assert jobs == {("tandem-router", "router"), ("tandem-workers", "prefill-0"), ("tandem-workers", "decode-0"),
                    ("tandem-planner", "router")}


def test_every_dashboard_query_returns_data(stack):
    values = dashboard_values()
    failures = []
    for item in dashboard_queries():
        result = query(stack.prometheus, substitute(item.expr, values))
        if item.where not in EXPECTED_EMPTY and not has_finite_value(result):
            failures.append(f"{item.where}: {item.expr} -> {json.dumps(result)[:200]}")
    assert not failures, "queries without data:\n" + "\n".join(failures)
    for where in EXPECTED_EMPTY:
        assert where in {item.where for item in dashboard_queries()}, f"stale EXPECTED_EMPTY entry {where}"


def test_dashboard_variables_list_what_was_scraped(stack):
    for dashboard in dashboards().values():
        for name in ("namespace", "model"):
            definition = variables(dashboard)[name]["definition"]  # label_values(<selector>, <label>)
            selector, label = definition.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
            selector = substitute(selector, {"namespace": ".*"})
            response = httpx.get(f"{stack.prometheus}/api/v1/label/{label}/values", params={"match[]": selector})
            found = response.json()["data"]
            assert found or name in EXPECTED_EMPTY_VARIABLES, f"{definition} lists nothing"
            if name == "model":
                assert found == [MODEL]


def test_every_alert_rule_evaluates_and_its_signals_return_data(stack):
    groups = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    failures = []
    for rule in alert_rules():
        state = loaded[rule["alert"]]
        if state["health"] != "ok":
            failures.append(f"{rule['alert']}: {state.get('lastError')}")
        for signal in signals(rule):
            if not has_finite_value(query(stack.prometheus, signal.expr)):
                failures.append(f"{signal.where}: {signal.expr} returns no data")
    for name in recorded_names():
        if not has_finite_value(query(stack.prometheus, name)):
            failures.append(f"recording rule {name} returns no data")
    assert not failures, "\n".join(failures)


def signals(rule: dict) -> list[Query]:
    from tests.deploy.promql import alert_signals

    return [Query(f"{rule['alert']} signal {i}", expr) for i, expr in enumerate(alert_signals(rule["expr"]))]


def test_queries_and_rules_name_only_metrics_the_cluster_exports(stack):
    scraped = set(httpx.get(f"{stack.prometheus}/api/v1/label/__name__/values").json()["data"])
    known = scraped | recorded_names()
    used = {name for item in dashboard_queries() for name in metric_names(item.expr)}
    used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    assert used - known == set()


def test_the_load_shows_in_the_numbers(stack):
    prom = stack.prometheus

    def total(expr: str) -> float:
        return scalar(prom, f"sum({expr})")

    assert total('tandem_workers{role="decode"}') == 1 and total('tandem_workers{role="prefill"}') == 1
    assert total('tandem_requests_finished_total{role="router", finish_reason=~"stop|length"}') == NUM_OK
    assert total("tandem_time_to_first_token_seconds_count") == NUM_OK
    assert total('tandem_requests_slo_met_total{ttft_le="+Inf", tpot_le="+Inf"}') == NUM_OK
    assert total('tandem_request_errors_total{status="404"}') == 1
    assert total('tandem_request_errors_total{status="400"}') == 1
    assert total('tandem_requests_total{role="router"}') == NUM_OK + 2
    # The corrupted first transfer: rejected by decode's checksum, failed at prefill, re-prefilled by the router.
    assert total('tandem_kv_transfer_checksum_mismatches_total{role="decode"}') == 1
    assert total('tandem_kv_transfer_failures_total{role="prefill"}') == 1
    assert total('tandem_router_retries_total{reason="kv_transfer_failed"}') == 1
    sent, received = (
        total('tandem_kv_transfer_bytes_total{role="prefill"}'),
        total('tandem_kv_transfer_bytes_total{role="decode"}'),
    )
    assert sent > 0 and sent == received
    assert total('tandem_prefill_tokens_total{role="prefill"}') > 0
    assert total('tandem_generation_tokens_total{role="decode"}') > 0
    assert total('tandem_request_decode_time_seconds_count{role="decode"}') > 0
    assert total('tandem_prefix_cache_queries_total{role="prefill"}') > 0
    assert total('tandem_spec_decode_num_accepted_tokens_total{role="decode"}') > 0
    assert total('tandem_spec_decode_num_emitted_tokens_total{role="decode"}') > total(
        'tandem_spec_decode_num_drafts_total{role="decode"}'
    )  # an accepted draft emits more than one token per verification
