"""Prometheus rules: promtool checks and unit tests, the alerts the operations issue asks for, sane metadata."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.promql import (
    LOCAL_CONFIG,
    RULE_TESTS_DIR,
    RULES_FILE,
    alert_rules,
    exported_metric_names,
    metric_names,
    recorded_names,
    rules,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Prometheus (make ops-tools, or apt-get install prometheus)"
)
# What the issue asks for, each mapped to the alert(s) that cover it.
REQUIRED = {
    "TTFT SLO burn": {"TandemTTFTSLOFastBurn", "TandemTTFTSLOSlowBurn"},
    "TPOT SLO burn": {"TandemTPOTSLOFastBurn", "TandemTPOTSLOSlowBurn"},
    "KV cache above 90% for 5 minutes": {"TandemKVCacheNearlyFull"},
    "waiting queue growing": {"TandemWaitingQueueGrowing"},
    "no prefill or no decode workers": {"TandemNoPrefillWorkers", "TandemNoDecodeWorkers"},
    "transfer failures": {"TandemKVTransferFailures", "TandemKVChecksumMismatch"},
    "error-rate spikes": {"TandemErrorRateHigh"},
    "planner wants more replicas than the cluster can place": {"TandemPlannerCannotPlace"},
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules():
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass():
    files = sorted(str(path) for path in RULE_TESTS_DIR.glob("*.yml"))
    assert files, f"no rule unit tests in {RULE_TESTS_DIR}"
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_local_prometheus_config_is_valid():
    result = promtool("check", "config", str(LOCAL_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_issue_alerts_exist():
    names = {rule["alert"] for rule in alert_rules()}
    for need, alerts in REQUIRED.items():
        assert alerts <= names, f"{need}: missing {alerts - names}"


def test_every_alert_has_a_severity_and_texts_and_keeps_namespace_and_model():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert {"namespace", "model"} <= {g.strip() for g in grouping.split(",")}, (rule["alert"], grouping)
    for rule in rules():
        for grouping in re.findall(r"\bby \(([^)]*)\)", rule["expr"]):
            assert {"namespace", "model"} <= {g.strip() for g in grouping.split(",")}, (rule, grouping)


def test_rules_read_only_exported_metrics():
    known = exported_metric_names() | recorded_names()
    for rule in rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')} reads {unknown}, which nothing exports"


def test_slo_thresholds_are_bucket_bounds():
    from common.metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, label_value

    bounds = {
        "tandem_time_to_first_token_seconds_bucket": {label_value(b) for b in LATENCY_BUCKETS},
        "tandem_time_per_output_token_seconds_bucket": {label_value(b) for b in TOKEN_LATENCY_BUCKETS},
    }
    for rule in rules():
        for metric, le in re.findall(r'(tandem_\w+_bucket)\{[^}]*\ble="([^"]+)"', rule["expr"]):
            assert le in bounds[metric], f"{rule['record']}: le={le} is not a bucket bound of {metric}"


def test_every_alert_is_unit_tested_firing():
    fired = set()
    for path in RULE_TESTS_DIR.glob("*.yml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            fired |= {case["alertname"] for case in test.get("alert_rule_test", []) if case.get("exp_alerts")}
    missing = {rule["alert"] for rule in alert_rules()} - fired
    assert not missing, f"alerts never shown firing in {RULE_TESTS_DIR}: {sorted(missing)}"
