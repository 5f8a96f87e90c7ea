"""The planner loop end to end: a load trace through decide into the Kubernetes scaler (fake scale API), and
`tandem planner --dry-run` for one decision against a fake Prometheus."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from prometheus_client import generate_latest

from services.launch import main
from services.planner.actuate import DryRun, KubernetesScaler
from services.planner.decide import Policy, PoolLimits, Slo
from services.planner.load import ClusterLoad, PoolLoad
from services.planner.loop import Planner
from services.planner.observe import promql
from tests.services.planner.fake_servers import FakeScaleApi, routes_handler, serve
from tests.services.planner.test_decide import PROFILE
from tests.services.planner.test_observe import FakeCluster

POLICY = Policy(Slo(0.5, 0.03), PoolLimits(1, 8), PoolLimits(1, 8), cooldown_s=60.0)


class TraceSource:
    """Loads at 10 s steps: (requests a second, prompt tokens, output tokens) each, observed replicas fixed."""

    def __init__(self, trace: list[tuple[float, float, float]]) -> None:
        self.trace = list(trace)

    def observe(self, now: float) -> ClusterLoad:
        rate, prompt, output = self.trace.pop(0)
        pools = (PoolLoad(role, 1, rate, prompt, output) for role in ("prefill", "decode"))
        return ClusterLoad(now, *pools)


def ticking(step_s: float = 10.0):
    clock = iter(range(0, 10_000, int(step_s)))
    return lambda: float(next(clock))


def test_the_planner_scales_the_deployments_and_adopts_a_count_set_by_someone_else():
    fake = FakeScaleApi({("serving", "tandem-prefill"): 1, ("serving", "tandem-decode"): 1})
    with serve(fake.handler()) as url:
        api = client.AppsV1Api(client.ApiClient(client.Configuration(host=url)))
        scaler = KubernetesScaler(api, "serving", {"prefill": "tandem-prefill", "decode": "tandem-decode"})
        trace = [(20.0, 1000, 50), (20.0, 100, 1000), (20.0, 100, 1000)]
        planner = Planner(PROFILE, POLICY, TraceSource(trace), scaler, clock=ticking())
        first = planner.step()
        assert [d.desired for d in first] == [3, 1]  # prefill-heavy: 20 / 8.89 -> 3 prefill
        assert fake.replicas == {("serving", "tandem-prefill"): 3, ("serving", "tandem-decode"): 1}
        planner.step()  # decode-heavy now: ceil(20 x 1000 x 0.03 / 64) = 10 -> the max, 8
        assert fake.replicas[("serving", "tandem-decode")] == 8
        fake.replicas[("serving", "tandem-decode")] = 5  # an operator scaled it by hand
        third = planner.step()
        assert (third[1].current, third[1].desired) == (5, 8)
        assert len(fake.patches) == 3  # only changes are patched: holds write nothing


def test_a_dry_run_planner_starts_from_the_observed_replicas():
    planner = Planner(PROFILE, POLICY, TraceSource([(5.0, 1000, 50)]), DryRun(), clock=ticking())
    prefill, decode = planner.step()
    assert (prefill.current, prefill.desired, decode.desired) == (1, 1, 1)


@pytest.fixture
def prometheus():
    values = {"replicas": {"prefill": 1, "decode": 2}, "finished": {"prefill": 20.0, "decode": 20.0},
              "prefill_tokens": {"prefill": 20_000.0}, "decode_tokens": {"decode": 1000.0}}
    by_text = {text: values.get(name, {}) for name, text in promql(60).items()}

    def query(params):
        vector = [{"metric": {"role": role}, "value": [0, str(v)]} for role, v in by_text[params["query"][0]].items()]
        return 200, "application/json", json.dumps({"status": "success", "data": {"result": vector}})

    with serve(routes_handler({"/api/v1/query": query})) as url:
        yield url


def test_tandem_planner_dry_run_prints_one_decision_per_pool(prometheus, tmp_path, capsys, monkeypatch):
    profile = tmp_path / "profile.json"
    profile.write_text(PROFILE.model_dump_json())
    monkeypatch.setenv("TANDEM_SLO_TPOT_MS", "30")
    code = main(["planner", "--dry-run", "--iterations", "1", "--interval-s", "0.01", "--prometheus-url", prometheus,
                 "--profile", str(profile), "--slo-ttft-ms", "500"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prefill: 1 -> 3: up: predicted TTFT unbounded (over capacity) at 1 > SLO 500 ms")
    # 1000 tokens/s: one worker would do even at the 24 ms margin (1000 x 0.024 / 45.1 streams), after the cool-down
    assert lines[1] == "decode: 2 -> 2: hold: 1 would do; cool-down 0/180 s"
    assert len(lines) == 2


def test_tandem_planner_without_a_profile_says_so(capsys):
    assert main(["planner", "--dry-run", "--iterations", "1"]) == 2
    assert "needs --profile" in capsys.readouterr().err


def test_tandem_planner_dry_run_scrapes_the_workers_through_the_router(tmp_path, capsys):
    """No Prometheus: the first scrape primes, the second gives rates, and that one decision is printed."""
    cluster = FakeCluster()
    scrapes = {"prefill": 0, "decode": 0}

    def worker_metrics(role: str):
        def answer(_query):
            scrapes[role] += 1  # each scrape finds 400 more 1000-token prompts prefilled: far past 8 workers
            cluster.finish(role, 400)
            cluster.set_engine(role, running=1, waiting=0, prefill_tokens=400_000 * scrapes[role], generation_tokens=0)
            return 200, "text/plain", generate_latest(cluster.workers[role].registry).decode()
        return answer

    profile = tmp_path / "profile.json"
    profile.write_text(PROFILE.model_dump_json())
    with serve(routes_handler({"/metrics": worker_metrics("prefill")})) as prefill_url, \
         serve(routes_handler({"/metrics": worker_metrics("decode")})) as decode_url:
        ports = {"prefill": int(prefill_url.rsplit(":", 1)[1]), "decode": int(decode_url.rsplit(":", 1)[1])}
        with serve(routes_handler(cluster.routes(ports))) as router_url:
            code = main(["planner", "--dry-run", "--iterations", "1", "--interval-s", "0.05", "--router-url",
                         router_url, "--profile", str(profile), "--slo-ttft-ms", "500", "--slo-tpot-ms", "30"])
    assert code == 0 and scrapes == {"prefill": 2, "decode": 2}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("prefill: 1 -> 8: up: predicted TTFT unbounded (over capacity) at 1")
    # no output tokens, so no decode load
    assert lines[1] == "decode: 1 -> 1: hold: 1 needed (TPOT SLO 30 ms with a 20% margin)"
    assert len(lines) == 2
