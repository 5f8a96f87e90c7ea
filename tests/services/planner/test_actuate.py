"""The Kubernetes actuator, through the real `kubernetes` client, against a small HTTP server that implements
GET / PATCH of apps/v1 deployments/{name}/scale (no API server can run here)."""

from __future__ import annotations

import pytest
from kubernetes import client

from services.planner.actuate import DryRun, KubernetesScaler, ScaleError
from tests.services.planner.fake_servers import FakeScaleApi, serve

DEPLOYMENTS = {"prefill": "tandem-prefill", "decode": "tandem-decode"}


@pytest.fixture
def fake_api():
    fake = FakeScaleApi({("serving", "tandem-prefill"): 2, ("serving", "tandem-decode"): 3})
    with serve(fake.handler()) as url:
        configuration = client.Configuration(host=url)
        configuration.retries = 0
        api = client.AppsV1Api(client.ApiClient(configuration))
        yield fake, api


def test_the_scaler_reads_and_patches_each_pools_deployment_scale(fake_api):
    fake, api = fake_api
    scaler = KubernetesScaler(api, "serving", DEPLOYMENTS)
    assert (scaler.replicas("prefill"), scaler.replicas("decode")) == (2, 3)
    scaler.scale("prefill", 5, "up: predicted TTFT 900 ms")
    assert fake.replicas == {("serving", "tandem-prefill"): 5, ("serving", "tandem-decode"): 3}
    namespace, name, content_type, body = fake.patches[0]
    assert (namespace, name, body) == ("serving", "tandem-prefill", {"spec": {"replicas": 5}})
    assert "patch" in content_type  # a merge or strategic-merge patch, as the API server requires for PATCH
    assert scaler.replicas("prefill") == 5


def test_the_scaler_reads_available_replicas_from_the_deployment_status(fake_api):
    fake, api = fake_api
    scaler = KubernetesScaler(api, "serving", DEPLOYMENTS)
    fake.available[("serving", "tandem-decode")] = 1
    assert (scaler.available("prefill"), scaler.available("decode")) == (2, 1)
    assert DryRun().available("decode") is None  # a dry run places nothing


def test_a_missing_deployment_is_a_clear_error(fake_api):
    _, api = fake_api
    scaler = KubernetesScaler(api, "serving", {"prefill": "no-such", "decode": "tandem-decode"})
    with pytest.raises(ScaleError, match="cannot scale the prefill Deployment serving/no-such: no such Deployment"):
        scaler.scale("prefill", 2, "test")
    with pytest.raises(ScaleError, match="cannot read the prefill Deployment"):
        scaler.replicas("prefill")
    wrong_namespace = KubernetesScaler(api, "other", DEPLOYMENTS)
    with pytest.raises(ScaleError, match="other/tandem-decode"):
        wrong_namespace.replicas("decode")


def test_the_dry_run_reports_and_remembers_without_scaling():
    lines: list[str] = []
    dry = DryRun(lines.append)
    assert dry.replicas("decode") is None
    dry.scale("decode", 4, "up: predicted TPOT 70 ms")
    assert lines == ["dry run: decode -> 4 (up: predicted TPOT 70 ms)"] and dry.replicas("decode") == 4
