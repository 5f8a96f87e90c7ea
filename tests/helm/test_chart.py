"""helm/tandem: lint, Kubernetes schemas, and the wiring between the chart and the real services.

Every check runs on the default values and on each deploy/examples/*.yaml. The services' side is read from the
code itself: flags from `services.launch.build_parser()`, environment names from `known_env_vars()`, router
routes from services/router/server.py, worker routes from a live `WorkerHttpServer`, metric names from a live
`WorkerMetrics` registry.
"""

from __future__ import annotations

import argparse
import ast
import base64
import json
import shutil
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.launch import build_parser, engine_config, known_env_vars, router_config, worker_settings
from tests.helm.chart import (
    CHART,
    COMPONENTS,
    NAMESPACE,
    RELEASE,
    REPO,
    WORKERS,
    Render,
    container_env,
    example_files,
    labels_match,
    port_numbers,
    render,
    resolve_port,
    run_helm,
)

KUBERNETES_VERSION = "1.35"
PLANNER_VALUES = REPO / "tests" / "helm" / "values" / "planner.yaml"
SCENARIOS = {
    "defaults": (),
    **{path.stem: (str(path),) for path in example_files()},
    "planner": (str(PLANNER_VALUES),),
}
# Custom resources have no schema in kubernetes-validate: each gets a check of the fields its operator requires.
CRD_REQUIRED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("spec.selector.matchLabels", "spec.endpoints"),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("spec.groups",),
    ("keda.sh/v1alpha1", "ScaledObject"): ("spec.scaleTargetRef.name", "spec.triggers"),
}


@pytest.fixture(params=list(SCENARIOS), ids=list(SCENARIOS))
def rendered(request: pytest.FixtureRequest) -> Render:
    return render(SCENARIOS[request.param])


def _dig(obj: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        obj = obj[key]
    return obj


def _check_rule_groups(name: str, groups: list[dict[str, Any]]) -> None:
    """What the Prometheus Operator requires of PrometheusRule groups: unique names; each rule an alert or a record."""
    assert len({g["name"] for g in groups}) == len(groups), f"{name}: duplicate group names"
    for group in groups:
        for rule in group["rules"]:
            assert rule.get("expr"), f"{name}: {group['name']}: a rule without expr"
            assert ("alert" in rule) != ("record" in rule), f"{name}: {group['name']}: {rule}"


def _parse_cli(argv: list[str]) -> Any:
    """Parse a container's args with the real `tandem` parser, as if no TANDEM_* variable were set."""
    try:
        return build_parser({}).parse_args(argv)
    except SystemExit:
        pytest.fail(f"`tandem {' '.join(argv)}` is rejected by services.launch.build_parser() (see stderr)")


# ---------------------------------------------------------------------------------------------------- helm itself


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_helm_lint_strict(scenario: str) -> None:
    values = [arg for path in SCENARIOS[scenario] for arg in ("-f", path)]
    result = run_helm("lint", "--strict", "{chart}", *values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_object_validates_against_kubernetes_schemas(rendered: Render) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="in the dev extra: pip install -e '.[dev]'")
    for obj in rendered.objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        crd = CRD_REQUIRED.get((obj["apiVersion"], obj["kind"]))
        if crd is not None:
            for field in crd:
                assert _dig(obj, field), f"{name}: {field} is empty"
            if obj["kind"] == "PrometheusRule":
                _check_rule_groups(name, obj["spec"]["groups"])
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{name}: no Kubernetes {KUBERNETES_VERSION} schema for {obj['apiVersion']}, not a known CRD")


def test_objects_are_labelled_and_namespaced(rendered: Render) -> None:
    for obj in rendered.objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/name"] == "tandem"
        assert obj["metadata"]["namespace"] == NAMESPACE


# ---------------------------------------------------------------------------------------------------- workers


def test_workers_request_a_gpu_and_shared_memory(rendered: Render) -> None:
    for role in WORKERS:
        pod = rendered.deployment(role)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, role
        shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_router_and_redis_request_no_gpu(rendered: Render) -> None:
    for deployment, container in rendered.containers():
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] not in WORKERS:
            assert "nvidia.com/gpu" not in str(container.get("resources")), deployment["metadata"]["name"]


def test_container_args_are_accepted_by_the_real_cli(rendered: Render) -> None:
    for component in COMPONENTS:
        (container,) = rendered.deployment(component)["spec"]["template"]["spec"]["containers"]
        args = _parse_cli(container["args"])
        assert args.command == component
        assert args.host == "0.0.0.0"
        assert args.model
        if component == "router":
            assert args.port == port_numbers(container)["http"]
        else:
            assert args.port == port_numbers(container)["grpc"]
            assert args.metrics_port == port_numbers(container)["metrics"]


def test_worker_advertises_its_pod_ip_and_drains_within_the_grace_period(rendered: Render) -> None:
    for role in WORKERS:
        pod = rendered.deployment(role)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = _parse_cli(container["args"])
        env = container_env(container)
        assert args.advertise_host == "$(POD_IP)"
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert args.worker_id == "$(POD_NAME)"
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert pod["terminationGracePeriodSeconds"] > args.drain_timeout_s, role


def test_args_only_reference_defined_env_vars(rendered: Render) -> None:
    """Kubernetes expands $(NAME) in args only for variables the container defines."""
    for deployment, container in rendered.containers():
        env = container_env(container)
        for arg in container.get("args", []):
            if arg.startswith("$(") and arg.endswith(")"):
                assert arg[2:-1] in env, f"{deployment['metadata']['name']}: {arg} is not defined in env"


def test_tandem_env_vars_are_ones_the_cli_reads(rendered: Render) -> None:
    known = known_env_vars()
    for deployment in rendered.of_kind("Deployment"):
        # Otherwise Kubernetes adds <SERVICE>_PORT=tcp://... for every Service, e.g. TANDEM_PORT for a Service "tandem".
        assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False
    for deployment, container in rendered.containers():
        for name in container_env(container):
            if name.startswith("TANDEM_"):
                assert name in known, f"{deployment['metadata']['name']}: {name} is read by no tandem flag"


def test_every_pod_finds_redis(rendered: Render) -> None:
    redis_services = [s for s in rendered.of_kind("Service") if s["metadata"]["name"].endswith("-redis")]
    for component in COMPONENTS:
        (container,) = rendered.deployment(component)["spec"]["template"]["spec"]["containers"]
        args = _parse_cli(container["args"])
        if redis_services:
            (service,) = redis_services
            port = service["spec"]["ports"][0]["port"]
            assert args.redis_url == f"redis://{service['metadata']['name']}:{port}/0"
        else:
            ref = container_env(container)["TANDEM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"]


# ---------------------------------------------------------------------------------------------------- probes


def _router_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every @app.<method>("...") in services/router/server.py."""
    tree = ast.parse((REPO / "services" / "router" / "server.py").read_text())
    routes = set()
    for node in ast.walk(tree):
        for decorator in getattr(node, "decorator_list", []):
            if (
                isinstance(decorator, ast.Call)
                and isinstance(decorator.func, ast.Attribute)
                and isinstance(decorator.func.value, ast.Name)
                and decorator.func.value.id == "app"
                and decorator.args
                and isinstance(decorator.args[0], ast.Constant)
            ):
                routes.add((decorator.func.attr.upper(), decorator.args[0].value))
    return routes


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {kind: container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}


def test_router_probes_hit_real_routes_on_the_http_port(rendered: Render) -> None:
    routes = _router_routes()
    assert ("GET", "/ready") in routes and ("GET", "/health") in routes
    (container,) = rendered.deployment("router")["spec"]["template"]["spec"]["containers"]
    port = _parse_cli(container["args"]).port
    for kind, probe in _probes(container).items():
        assert ("GET", probe["httpGet"]["path"]) in routes, kind
        assert resolve_port(container, probe["httpGet"]["port"]) == port, kind


@pytest.fixture(scope="module")
def worker_http() -> str:
    """A real worker metrics server (ready: loaded and registered) on a free port; yields its base URL."""
    from prometheus_client import CollectorRegistry

    from services.worker_http import WorkerHealth, WorkerHttpServer

    server = WorkerHttpServer("127.0.0.1", 0, CollectorRegistry(), WorkerHealth(loaded=True, registered=True))
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


def test_worker_probes_hit_the_grpc_port_and_real_http_routes(rendered: Render, worker_http: str) -> None:
    for role in WORKERS:
        (container,) = rendered.deployment(role)["spec"]["template"]["spec"]["containers"]
        args = _parse_cli(container["args"])
        probes = _probes(container)
        assert probes["startup"]["grpc"]["port"] == args.port, "startup waits for the gRPC health service"
        for kind, probe in probes.items():
            if "httpGet" in probe:
                assert resolve_port(container, probe["httpGet"]["port"]) == args.metrics_port, kind
                with urllib.request.urlopen(worker_http + probe["httpGet"]["path"], timeout=5) as response:
                    assert response.status == 200, (kind, probe["httpGet"]["path"])
            else:
                assert probe["grpc"]["port"] == args.port, kind
        assert probes["liveness"]["httpGet"]["path"] == "/health", "liveness must hold while the worker drains"


# ---------------------------------------------------------------------------------------------------- wiring


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_deployment_selectors_match_their_pod_labels(rendered: Render) -> None:
    deployments = rendered.of_kind("Deployment")
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert labels_match(selector, _pod_labels(deployment))
        others = [d for d in deployments if d is not deployment and labels_match(selector, _pod_labels(d))]
        assert not others, f"{deployment['metadata']['name']} also selects {others[0]['metadata']['name']}'s pods"


def _selected_deployment(render_: Render, selector: dict[str, str], what: str) -> dict[str, Any]:
    selected = [d for d in render_.of_kind("Deployment") if labels_match(selector, _pod_labels(d))]
    assert len(selected) == 1, f"{what} selects {len(selected)} Deployments' pods"
    return selected[0]


def test_services_select_one_deployment_and_target_its_ports(rendered: Render) -> None:
    for service in rendered.of_kind("Service"):
        name = service["metadata"]["name"]
        deployment = _selected_deployment(rendered, service["spec"]["selector"], f"Service {name}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for port in service["spec"]["ports"]:
            resolve_port(container, port["targetPort"])


def test_worker_services_are_headless(rendered: Render) -> None:
    for role in WORKERS:
        assert rendered.get("Service", f"{RELEASE}-tandem-{role}")["spec"]["clusterIP"] == "None"


def test_pdbs_select_one_deployment(rendered: Render) -> None:
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        _selected_deployment(rendered, pdb["spec"]["selector"]["matchLabels"], f"PDB {pdb['metadata']['name']}")


def test_ingress_and_monitors_point_at_real_service_ports(rendered: Render) -> None:
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for ingress in rendered.of_kind("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                ports = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in ports
    for monitor in rendered.of_kind("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [s for s in services.values() if labels_match(selector, s["metadata"]["labels"])]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
            assert endpoint["path"] == "/metrics"


def test_kubectl_scale_names_exist(rendered: Render) -> None:
    names = rendered.names("Deployment")
    for role in WORKERS:
        assert f"{RELEASE}-tandem-{role}" in names


def test_autoscalers_target_real_deployments_without_fixed_replicas(rendered: Render) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    for scaler in rendered.of_kind("HorizontalPodAutoscaler") + rendered.of_kind("ScaledObject"):
        target = scaler["spec"]["scaleTargetRef"]
        assert target["name"] in deployments, target
        assert target.get("kind", "Deployment") == "Deployment"
        assert "replicas" not in deployments[target["name"]]["spec"], "the autoscaler owns replicas"


def test_autoscaling_metrics_are_exported_by_the_pool_they_scale(rendered: Render) -> None:
    from common.metrics import WorkerMetrics

    for scaler in rendered.of_kind("HorizontalPodAutoscaler"):
        for metric in scaler["spec"]["metrics"]:
            if metric["type"] != "Pods":
                continue
            role = scaler["metadata"]["labels"]["app.kubernetes.io/component"]
            exported = {m.name for m in WorkerMetrics("m", role).registry.collect()}
            assert metric["pods"]["metric"]["name"] in exported, (role, sorted(exported))


def test_examples_scale_the_pools_as_named() -> None:
    two_by_four = render(SCENARIOS["prefill-2-decode-4"])
    assert two_by_four.deployment("prefill")["spec"]["replicas"] == 2
    assert two_by_four.deployment("decode")["spec"]["replicas"] == 4
    single = render(SCENARIOS["single-gpu"])
    gpus = sum(
        int(d["spec"]["replicas"]) * int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        for d, c in single.containers()
    )
    assert gpus == 1
    autoscaled = render(SCENARIOS["autoscaling"])
    assert {h["spec"]["scaleTargetRef"]["name"] for h in autoscaled.of_kind("HorizontalPodAutoscaler")} == {
        f"{RELEASE}-tandem-{c}" for c in COMPONENTS
    }
    assert len(render(SCENARIOS["autoscaling-keda"]).of_kind("ScaledObject")) == 2


# ---------------------------------------------------------------------------------------------------- pods


def test_tandem_pods_run_non_root_on_a_read_only_root(rendered: Render) -> None:
    for component in COMPONENTS:
        pod = rendered.deployment(component)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/tmp", _parse_cli(container["args"]).download_dir} <= mounts, "writable /tmp and model cache"
        assert container_env(container)["HOME"]["value"] in mounts


def test_redis_runs_only_when_bundled() -> None:
    assert render().get("Deployment", f"{RELEASE}-tandem-redis")
    external = render(SCENARIOS["external-redis"])
    assert not [d for d in external.names("Deployment") if d.endswith("-redis")]
    assert not external.of_kind("Secret"), "an existing Secret is used as is"


def test_external_redis_url_goes_into_a_secret_and_rolls_the_pods() -> None:
    url = "redis://:s3cret@redis.example:6379/2"
    rendered = render(sets=("redis.enabled=false", f"redis.external.url={url}"))
    (secret,) = rendered.of_kind("Secret")
    assert base64.b64decode(secret["data"]["redis-url"]).decode() == url
    for component in COMPONENTS:
        template = rendered.deployment(component)["spec"]["template"]
        (container,) = template["spec"]["containers"]
        ref = container_env(container)["TANDEM_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "redis-url"}
        assert "--redis-url" not in container["args"], "the URL may hold a password: never in args"
        assert "checksum/redis-url" in template["metadata"]["annotations"]
    other = render(sets=("redis.enabled=false", "redis.external.url=redis://other:6379/0"))
    assert (
        other.deployment("decode")["spec"]["template"]["metadata"]["annotations"]
        != rendered.deployment("decode")["spec"]["template"]["metadata"]["annotations"]
    )


def test_secrets_reach_the_right_variables() -> None:
    rendered = render(SCENARIOS["prefill-2-decode-4"] + SCENARIOS["external-redis"])
    for component in COMPONENTS:
        (container,) = rendered.deployment(component)["spec"]["template"]["spec"]["containers"]
        env = container_env(container)
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "HF_TOKEN"}
    (router,) = rendered.deployment("router")["spec"]["template"]["spec"]["containers"]
    keys = container_env(router)["TANDEM_API_KEYS"]["valueFrom"]["secretKeyRef"]
    assert keys == {"name": "tandem-api-keys", "key": "api-keys"}


def test_extra_args_env_and_volumes_reach_the_containers() -> None:
    rendered = render(
        sets=(
            "decode.extraArgs={--block-size,32}",
            "decode.extraEnv[0].name=NCCL_DEBUG",
            "decode.extraEnv[0].value=INFO",
            "model.volume.existingClaim=models",
            "model.name=/models/llama",
            "imagePullSecrets[0].name=regcred",
        )
    )
    pod = rendered.deployment("decode")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = _parse_cli(container["args"])
    assert args.block_size == 32 and args.model == "/models/llama"
    assert container_env(container)["NCCL_DEBUG"]["value"] == "INFO"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]


SPECULATION = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@pytest.mark.parametrize("given_as", ["object", "json text"])
def test_speculative_config_reaches_the_decode_workers_only(given_as: str, tmp_path: Path) -> None:
    value = SPECULATION if given_as == "object" else json.dumps(SPECULATION)
    values = tmp_path / "speculation.yaml"
    values.write_text(yaml.safe_dump({"decode": {"speculativeConfig": value}}))
    rendered = render((str(values),))
    args = {
        role: _parse_cli(rendered.deployment(role)["spec"]["template"]["spec"]["containers"][0]["args"])
        for role in WORKERS
    }
    spec = engine_config(args["decode"]).scheduler.speculative_config
    assert spec is not None and spec.model_dump(include=set(SPECULATION)) == SPECULATION
    assert args["prefill"].speculative_config is None


def test_speculation_is_off_by_default(rendered: Render) -> None:
    for role in WORKERS:
        (container,) = rendered.deployment(role)["spec"]["template"]["spec"]["containers"]
        assert "--speculative-config" not in container["args"], role


def _worker_args(rendered: Render) -> dict[str, argparse.Namespace]:
    return {
        role: _parse_cli(rendered.deployment(role)["spec"]["template"]["spec"]["containers"][0]["args"])
        for role in WORKERS
    }


@pytest.mark.parametrize("dtype", ["auto", "fp8", "fp8_e4m3"])
def test_kv_cache_dtype_reaches_both_pools_alike(dtype: str) -> None:
    """A decode worker refuses KV blocks of the other kind, so the value is model-wide, not per pool."""
    args = _worker_args(render(sets=(f"model.kvCacheDtype={dtype}",)))
    assert {role: engine_config(a).cache.kv_cache_dtype for role, a in args.items()} == dict.fromkeys(WORKERS, dtype)


def test_quantization_reaches_both_pools_and_is_off_by_default(rendered: Render) -> None:
    assert {engine_config(a).model.quantization for a in _worker_args(rendered).values()} == {None}
    args = _worker_args(render(sets=("model.quantization=fp8",)))
    assert {role: engine_config(a).model.quantization for role, a in args.items()} == dict.fromkeys(WORKERS, "fp8")


def _gpus(rendered: Render, role: str) -> dict[str, Any]:
    (container,) = rendered.deployment(role)["spec"]["template"]["spec"]["containers"]
    return {part: amounts.get("nvidia.com/gpu") for part, amounts in container["resources"].items()}


def test_tensor_parallel_size_sets_the_flag_and_the_pods_gpus() -> None:
    sets = ("prefill.tensorParallelSize=2", "decode.tensorParallelSize=4")
    sets += ("decode.resources.requests.nvidia\\.com/gpu=1",)
    rendered = render(sets=sets)
    args = _worker_args(rendered)
    for role, size in (("prefill", 2), ("decode", 4)):
        assert engine_config(args[role]).model.tensor_parallel_size == size
    assert _gpus(rendered, "prefill") == {"requests": None, "limits": 2}, "no GPU request was asked for: none added"
    assert _gpus(rendered, "decode") == {"requests": 4, "limits": 4}
    assert _gpus(render(), "decode") == {"requests": None, "limits": 1}
    cpu = render(sets=("prefill.resources.limits.nvidia\\.com/gpu=null",))
    assert _gpus(cpu, "prefill") == {"requests": None, "limits": None}, "a pool without GPUs gets none"


def test_a_tensor_parallel_pool_renders_worker_flags_the_workers_accept() -> None:
    from common.engine.llm import validate_engine_args

    args = _worker_args(render(sets=("prefill.tensorParallelSize=2", "decode.tensorParallelSize=4")))
    for role, size in (("prefill", 2), ("decode", 4)):
        settings = worker_settings(args[role])
        validate_engine_args(settings.engine)  # raises for what the engine refuses
        assert settings.engine.model.tensor_parallel_size == size


@pytest.mark.parametrize(("value", "expected"), [("64MiB", 64 * 2**20), (33554432, 33554432), ("", 32 * 2**20)])
def test_max_request_body_reaches_the_router(value: str | int, expected: int, tmp_path: Path) -> None:
    values = tmp_path / "body.yaml"
    values.write_text(yaml.safe_dump({"router": {"maxRequestBody": value}}))  # a file: helm reads 33554432 as a float
    (container,) = render((str(values),)).deployment("router")["spec"]["template"]["spec"]["containers"]
    assert router_config(_parse_cli(container["args"])).max_request_body == expected


CHAT_TEMPLATE = "{% for m in messages %}<｜{{ m.role }}｜>{{ m.content }}{{ '\\n' }}{% endfor %}\n"


def test_chat_template_reaches_the_router_as_written(tmp_path: Path) -> None:
    """Byte for byte: as a file it is not unescaped (flag text would be), and non-ASCII survives."""
    from services.router.vllm_api import load_chat_template

    values = tmp_path / "template.yaml"
    values.write_text(yaml.safe_dump({"router": {"chatTemplate": {"text": CHAT_TEMPLATE}}}))
    rendered = render((str(values),))
    template = rendered.deployment("router")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    path = Path(_parse_cli(container["args"]).chat_template)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "chat-template"]
    assert path.parent == Path(mount["mountPath"])
    volume = {v["name"]: v for v in template["spec"]["volumes"]}["chat-template"]["configMap"]
    configmap = rendered.get("ConfigMap", volume["name"])
    assert volume["items"] == [{"key": path.name, "path": path.name}]
    (tmp_path / path.name).write_text(configmap["data"][path.name], encoding="utf-8")
    assert load_chat_template(str(tmp_path / path.name)) == CHAT_TEMPLATE
    assert "checksum/chat-template" in template["metadata"]["annotations"]
    assert "--chat-template" not in str(render().deployment("router")), "off by default: the model's template"


def test_chat_template_from_an_existing_configmap() -> None:
    rendered = render(sets=("router.chatTemplate.existingConfigMap=my-template", "router.chatTemplate.key=t.jinja"))
    template = rendered.deployment("router")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    volume = {v["name"]: v for v in template["spec"]["volumes"]}["chat-template"]["configMap"]
    assert volume == {"name": "my-template", "items": [{"key": "t.jinja", "path": "t.jinja"}]}
    assert Path(_parse_cli(container["args"]).chat_template).name == "t.jinja"
    assert not [c for c in rendered.names("ConfigMap") if c.endswith("chat-template")]


# ---------------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "item",
    [
        "decode.replicas=abc",
        "prefill.gpuMemoryUtilization=lots",
        "router.port=http",
        "transport=rdma",
        "decode.autoscaling.metric.averageValue=1Gi",
        "decode.speculativeConfig=4",
        "model.kvCacheDtype=fp16",
        "model.quantization=int8",
        "router.maxRequestBody=lots",
        "prefill.tensorParallelSize=0",
        "router.chatTemplate.key=../x",
    ],
)
def test_schema_rejects_wrong_types(item: str) -> None:
    result = run_helm("template", RELEASE, "{chart}", "--set", item)
    assert result.returncode != 0
    assert "schema" in result.stderr, result.stderr
    assert "/" + item.split("=")[0].replace(".", "/") in result.stderr


def test_lint_fails_on_a_bad_values_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"prefill": {"replicas": "two", "gpuMemoryUtilisation": 0.8}}))
    result = run_helm("lint", "{chart}", "-f", str(bad))
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "/prefill/replicas" in out and "gpuMemoryUtilisation" in out, out


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("decode.terminationGracePeriodSeconds=60",), "must exceed decode.drainTimeoutSeconds"),
        (("redis.enabled=false",), "redis.external.url or redis.external.existingSecret"),
        (("prefill.autoscaling.enabled=true", "prefill.autoscaling.type=keda"), "keda.serverAddress is required"),
        (("router.pdb.minAvailable=1",), "only one of minAvailable and maxUnavailable"),
        (("prefill.speculativeConfig.method=ngram",), "prefill workers never speculate"),
    ],
)
def test_chart_refuses_inconsistent_values(sets: tuple[str, ...], message: str) -> None:
    result = run_helm("template", RELEASE, "{chart}", *(a for s in sets for a in ("--set", s)))
    assert result.returncode != 0 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------------- monitoring


RULES = {
    "groups": [
        {
            "name": "tandem-test",
            "rules": [
                {
                    "alert": "TandemTest",
                    "expr": "up == 0",
                    "for": "5m",
                    "annotations": {"summary": "{{ $labels.pod }} is down"},
                }
            ],
        }
    ]
}


@pytest.fixture(scope="module")
def chart_with_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the chart whose files/ holds one dashboard and one rules file instead of the symlinks."""
    chart = tmp_path_factory.mktemp("chart") / "tandem"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("files"))
    (chart / "files" / "dashboards").mkdir(parents=True)
    (chart / "files" / "dashboards" / "tandem_slo.json").write_text('{"title": "Tandem SLO", "panels": []}\n')
    (chart / "files" / "rules").mkdir()
    (chart / "files" / "rules" / "tandem-rules.yml").write_text(yaml.safe_dump(RULES))
    return chart


def test_dashboards_become_configmaps_for_the_grafana_sidecar(chart_with_files: Path) -> None:
    rendered = render(chart=chart_with_files)
    (configmap,) = rendered.of_kind("ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["name"] == f"{RELEASE}-tandem-dashboard-tandem-slo"
    assert configmap["data"] == {"tandem_slo.json": '{"title": "Tandem SLO", "panels": []}'}
    assert not render(sets=("grafana.dashboards.enabled=false",), chart=chart_with_files).of_kind("ConfigMap")


def test_rules_file_becomes_a_prometheus_rule_untouched(chart_with_files: Path) -> None:
    (rule,) = render(chart=chart_with_files).of_kind("PrometheusRule")
    assert rule["spec"]["groups"] == RULES["groups"], "{{ $labels }} must reach Prometheus as written"


def test_operator_objects_only_where_the_operator_is(chart_with_files: Path) -> None:
    bare = render(apis=(), chart=chart_with_files)
    assert not bare.of_kind("ServiceMonitor") and not bare.of_kind("PrometheusRule")
    full = render(chart=chart_with_files)
    assert len(full.of_kind("ServiceMonitor")) == 3 and full.of_kind("PrometheusRule")
    off = render(
        sets=("monitoring.serviceMonitor.enabled=false", "monitoring.prometheusRule.enabled=false"),
        chart=chart_with_files,
    )
    assert not off.of_kind("ServiceMonitor") and not off.of_kind("PrometheusRule")


def test_chart_files_link_to_the_canonical_dashboards_and_rules() -> None:
    for name, target in (("dashboards", "deploy/grafana/dashboards"), ("rules", "deploy/prometheus/rules")):
        link = CHART / "files" / name
        assert link.is_symlink() and link.resolve() == (REPO / target).resolve(), f"{link} -> {target}"


def test_real_dashboards_become_configmaps() -> None:
    dashboards = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
    if not dashboards:
        pytest.skip("deploy/grafana/dashboards has no dashboard yet")
    configmaps = render().of_kind("ConfigMap")
    assert sorted(key for c in configmaps for key in c["data"]) == [p.name for p in dashboards]
    for configmap in configmaps:
        (text,) = configmap["data"].values()
        assert json.loads(text)["title"], configmap["metadata"]["name"]


def test_real_rules_become_the_prometheus_rule() -> None:
    files = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.y*ml"))
    if not files:
        pytest.skip("deploy/prometheus/rules has no rules file yet")
    (rule,) = render().of_kind("PrometheusRule")
    assert rule["spec"]["groups"] == [g for path in files for g in yaml.safe_load(path.read_text())["groups"]]


def test_packaged_chart_carries_the_linked_files(tmp_path: Path) -> None:
    """`helm package` follows the symlinks, so a chart from a repository has the dashboards and rules too."""
    result = run_helm("package", "{chart}", "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (package,) = tmp_path.glob("tandem-*.tgz")
    with tarfile.open(package) as archive:
        packaged = {Path(name).name for name in archive.getnames() if "/files/" in name}
    linked = {p.name for sub in ("dashboards", "rules") for p in (CHART / "files" / sub).iterdir()}
    assert packaged == linked


# ---------------------------------------------------------------------------------------------------- NOTES.txt


def test_notes_say_how_to_reach_scale_and_observe() -> None:
    result = run_helm("install", RELEASE, "{chart}", "--dry-run=client", "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    for role in WORKERS:
        assert f"kubectl -n {NAMESPACE} scale deployment/{RELEASE}-tandem-{role} --replicas=" in notes
    assert f"port-forward svc/{RELEASE}-tandem-router" in notes
    assert "/v1/chat/completions" in notes and "Grafana" in notes and "/metrics" in notes


# ---------------------------------------------------------------------------------------------------- planner


PLANNER = f"{RELEASE}-tandem-planner"
PLANNER_KINDS = ("Deployment", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Service", "ServiceMonitor")


def _planner_objects(rendered: Render) -> dict[str, dict[str, Any]]:
    """Kind -> the object of the planner component (at most one per kind)."""
    found: dict[str, dict[str, Any]] = {}
    for obj in rendered.objects:
        if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "planner":
            assert obj["kind"] not in found, f"two planner {obj['kind']}s"
            found[obj["kind"]] = obj
    return found


def _planner_args(rendered: Render) -> tuple[dict[str, Any], Any]:
    (container,) = rendered.get("Deployment", PLANNER)["spec"]["template"]["spec"]["containers"]
    return container, _parse_cli(container["args"])


def _planner_option_strings() -> set[str]:
    """Every option string `tandem planner` defines (argparse would also take an abbreviation: the chart must not)."""
    parser = build_parser({})
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(commands.choices["planner"]._option_string_actions)


@pytest.mark.parametrize("sets", [(), ("planner.prometheusUrl=http://prometheus:9090", "planner.dryRun=true")])
def test_planner_flags_are_the_parsers_own_names(sets: tuple[str, ...]) -> None:
    container, _ = _planner_args(render(SCENARIOS["planner"], sets=sets))
    flags = {a for a in container["args"] if a.startswith("--")}
    assert flags <= _planner_option_strings(), sorted(flags - _planner_option_strings())
    assert {"--profile", "--k8s-namespace", "--prefill-deployment", "--decode-deployment"} <= flags


def test_planner_objects_exist_only_when_enabled() -> None:
    assert not _planner_objects(render()), "planner.enabled defaults to false"
    objects = _planner_objects(render(SCENARIOS["planner"]))
    assert sorted(objects) == sorted(PLANNER_KINDS)
    assert {o["metadata"]["name"] for k, o in objects.items() if k != "ConfigMap"} == {PLANNER}


def test_planner_args_are_accepted_by_the_real_cli_and_target_this_release() -> None:
    rendered = render(SCENARIOS["planner"])
    deployment = rendered.get("Deployment", PLANNER)
    container, args = _planner_args(rendered)
    assert args.command == "planner" and deployment["spec"]["replicas"] == 1
    assert args.k8s_namespace == NAMESPACE
    assert args.prefill_deployment == rendered.deployment("prefill")["metadata"]["name"]
    assert args.decode_deployment == rendered.deployment("decode")["metadata"]["name"]
    service = rendered.get("Service", f"{RELEASE}-tandem-router")
    assert args.router_url == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert args.prometheus_url is None and args.dry_run is False
    values = yaml.safe_load(PLANNER_VALUES.read_text())["planner"]
    assert (args.slo_ttft_ms, args.slo_tpot_ms, args.cooldown_s) == (500, 30, 120)
    assert (args.min_prefill, args.max_prefill) == (values["prefill"]["minReplicas"], values["prefill"]["maxReplicas"])
    assert (args.min_decode, args.max_decode) == (values["decode"]["minReplicas"], values["decode"]["maxReplicas"])
    assert (args.interval_s, args.window_s, args.band) == (15, 60, 0.2), "the chart's defaults reach the flags"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert Path(args.profile).parent == Path(mounts["profile"])


def test_planner_values_reach_the_flags_and_image() -> None:
    rendered = render(
        SCENARIOS["planner"],
        sets=(
            "planner.prometheusUrl=http://prometheus-operated.monitoring:9090",
            "planner.dryRun=true",
            "planner.image.repository=registry.example.com/tandem-planner",
            "planner.extraArgs={--iterations,3}",
        ),
    )
    container, args = _planner_args(rendered)
    assert args.prometheus_url == "http://prometheus-operated.monitoring:9090"
    assert "--router-url" not in container["args"]
    assert args.dry_run is True and args.iterations == 3
    assert container["image"] == "registry.example.com/tandem-planner:0.1.0"
    (chart_default,) = [
        c["image"] for d, c in render(SCENARIOS["planner"]).containers() if d["metadata"]["name"] == PLANNER
    ]
    (router,) = render(SCENARIOS["planner"]).deployment("router")["spec"]["template"]["spec"]["containers"]
    assert chart_default == router["image"], "the planner runs the chart's image by default"


def test_planner_role_only_gets_and_patches_the_two_worker_scales_and_reads_their_status() -> None:
    rendered = render(SCENARIOS["planner"])
    role = rendered.get("Role", PLANNER)
    workers = sorted(rendered.deployment(w)["metadata"]["name"] for w in WORKERS)
    scale, status = role["rules"]
    assert scale["apiGroups"] == ["apps"] and scale["resources"] == ["deployments/scale"]
    assert sorted(scale["verbs"]) == ["get", "patch"] and sorted(scale["resourceNames"]) == workers
    assert status["apiGroups"] == ["apps"] and status["resources"] == ["deployments/status"]
    assert status["verbs"] == ["get"] and sorted(status["resourceNames"]) == workers, "read-only: availability"
    binding = rendered.get("RoleBinding", PLANNER)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PLANNER}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": PLANNER, "namespace": NAMESPACE}]
    pod = rendered.get("Deployment", PLANNER)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == rendered.get("ServiceAccount", PLANNER)["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True, "the in-cluster client reads the mounted token"
    assert not rendered.of_kind("ClusterRole") and not rendered.of_kind("ClusterRoleBinding")
    assert len(rendered.of_kind("Role")) == 1, "the router and workers get no API access"


def test_planner_pod_runs_non_root_on_a_read_only_root() -> None:
    pod = render(SCENARIOS["planner"]).get("Deployment", PLANNER)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"/tmp", container_env(container)["HOME"]["value"]} <= {m["mountPath"] for m in container["volumeMounts"]}


def test_planner_profile_configmap_holds_a_profile_the_planner_loads(tmp_path: Path) -> None:
    from services.planner.profile import load_profile

    rendered = render(SCENARIOS["planner"])
    configmap = _planner_objects(rendered)["ConfigMap"]
    container, args = _planner_args(rendered)
    volume = {v["name"]: v for v in rendered.get("Deployment", PLANNER)["spec"]["template"]["spec"]["volumes"]}
    assert volume["profile"]["configMap"]["name"] == configmap["metadata"]["name"]
    ((key, text),) = configmap["data"].items()
    assert Path(args.profile).name == key
    (tmp_path / key).write_text(text)
    assert load_profile(tmp_path / key).prefill.tokens_per_s == 20000
    string_values = tmp_path / "profile-as-string.yaml"
    string_values.write_text(yaml.safe_dump({"planner": {"profile": {"json": text}}}))
    as_string = render((*SCENARIOS["planner"], str(string_values)))
    assert json.loads(_planner_objects(as_string)["ConfigMap"]["data"][key]) == json.loads(text)


def test_planner_rolls_on_a_new_profile_and_mounts_an_existing_configmap() -> None:
    def annotations(rendered: Render) -> dict[str, str]:
        return rendered.get("Deployment", PLANNER)["spec"]["template"]["metadata"]["annotations"]

    base = render(SCENARIOS["planner"])
    faster = render(SCENARIOS["planner"], sets=("planner.profile.json.prefill.tokens_per_s=40000",))
    assert annotations(base)["checksum/profile"] != annotations(faster)["checksum/profile"]
    mine = render(
        SCENARIOS["planner"], sets=("planner.profile.existingConfigMap=my-profile", "planner.profile.key=p.json")
    )
    assert "ConfigMap" not in _planner_objects(mine)
    container, args = _planner_args(mine)
    volume = {v["name"]: v for v in mine.get("Deployment", PLANNER)["spec"]["template"]["spec"]["volumes"]}
    assert volume["profile"]["configMap"] == {"name": "my-profile", "items": [{"key": "p.json", "path": "p.json"}]}
    assert Path(args.profile).name == "p.json"


def test_worker_replicas_are_left_to_the_planner() -> None:
    rendered = render(SCENARIOS["planner"])
    for role in WORKERS:
        assert "replicas" not in rendered.deployment(role)["spec"], f"helm upgrade would reset the planner's {role}"
    assert not rendered.of_kind("HorizontalPodAutoscaler") and not rendered.of_kind("ScaledObject")


PLANNER_ON = ("planner.enabled=true", "planner.profile.existingConfigMap=p")


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            (*PLANNER_ON, "decode.autoscaling.enabled=true"),
            "planner.enabled and decode.autoscaling.enabled are both on",
        ),
        (
            (*PLANNER_ON, "prefill.autoscaling.enabled=true", "prefill.autoscaling.type=keda"),
            "planner.enabled and prefill.autoscaling.enabled are both on",
        ),
        ((*PLANNER_ON, "planner.decode.minReplicas=5", "planner.decode.maxReplicas=4"), "must not exceed"),
        (("planner.enabled=true",), "planner.profile.json (the capacity profile) or planner.profile.existingConfigMap"),
    ],
)
def test_chart_refuses_inconsistent_planner_values(sets: tuple[str, ...], message: str) -> None:
    result = run_helm("template", RELEASE, "{chart}", *(a for s in sets for a in ("--set", s)))
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize(
    "item",
    [
        "planner.cooldownSeconds=-1",
        "planner.intervalSeconds=0",
        "planner.slo.ttftMs=0",
        "planner.slo.tpotMs=fast",
        "planner.band=1",
        "planner.prefill.minReplicas=-1",
        "planner.decode.maxReplicas=0",
        "planner.prometheusUrl=prometheus:9090",
        "planner.dryRun=maybe",
        "planner.replicas=2",
    ],
)
def test_schema_rejects_bad_planner_values(item: str) -> None:
    result = run_helm("template", RELEASE, "{chart}", "--set", item)
    assert result.returncode != 0
    assert "schema" in result.stderr, result.stderr
    path = item.split("=")[0]
    where = "/planner" if path == "planner.replicas" else "/" + path.replace(".", "/")
    assert where in result.stderr, result.stderr


def test_notes_say_what_the_planner_does() -> None:
    result = run_helm(
        "install", RELEASE, "{chart}", "--dry-run=client", "--namespace", NAMESPACE, "-f", str(PLANNER_VALUES)
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f"logs deployment/{PLANNER}" in notes
    assert "TTFT 500 ms / TPOT 30 ms" in notes and "prefill 0-4, decode 1-6" in notes
    assert "scale deployment/" not in notes, "no manual scaling advice while the planner owns the counts"
    assert "the chart refuses" in notes
    assert "WARNING" not in notes
    two_routers = run_helm(
        "install", RELEASE, "{chart}", "--dry-run=client", "-f", str(PLANNER_VALUES), "--set", "router.replicas=2"
    )
    assert "WARNING: several router pods and no planner.prometheusUrl" in two_routers.stdout


def test_planner_metrics_are_served_and_scraped() -> None:
    rendered = render(SCENARIOS["planner"])
    (container,) = rendered.get("Deployment", PLANNER)["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--metrics-port") + 1] == "9500"
    assert container["ports"] == [{"name": "metrics", "containerPort": 9500}]
    service = rendered.get("Service", PLANNER)
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9500, "targetPort": "metrics"}]
    pod_labels = rendered.get("Deployment", PLANNER)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = rendered.get("ServiceMonitor", PLANNER)
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_planner_correction_values_reach_the_flags() -> None:
    _, args = _planner_args(render(SCENARIOS["planner"]))
    assert (args.no_correction, args.settle_s) == (False, 60), "the chart's defaults reach the flags"
    sets = ("planner.correction.enabled=false", "planner.correction.settleSeconds=30")
    _, args = _planner_args(render(SCENARIOS["planner"], sets=sets))
    assert (args.no_correction, args.settle_s) == (True, 30)
