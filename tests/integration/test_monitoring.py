"""The Grafana dashboard and Prometheus alert rules in deploy/monitoring/: the rules pass
`promtool check rules`, and every series the dashboard and the rules query is one a real
server's /metrics serves.

promtool comes from Debian's `prometheus` package, downloaded once (`apt-get download`, not
installed) and unpacked into the git-ignored .cache/promtool/ of the checkout. Where it cannot
be had, the promtool test is skipped with the reason, or fails under CI (the CI variable set).
"""

import json
import os
import re
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from servers import start_server

from shardgate.proto.common import free_port

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "shardgate-alerts.yaml"
DASHBOARD = MONITORING / "shardgate-dashboard.json"
PROMTOOL_DIR = ROOT / ".cache" / "promtool"
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: its identifiers, once strings, label
    matchers, ranges, label lists (by, without, on, ignoring, group_*), numbers, durations,
    function names and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[A-Za-z0-9]*", " ", expr)  # numbers and durations (5m, 1h30m)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        if not expr[match.end() :].lstrip().startswith("(") and match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def rule_expressions() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def test_metric_names_are_read_from_promql():
    expr = 'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model", x="b c"}[5m]))) / on(model) b_total > 2e3'
    assert metric_names(expr) == {"a_bucket", "b_total"}
    assert metric_names("max by (replica) (kv) == 0 and up offset 5m") == {"kv", "up"}


@pytest.fixture(scope="module")
def promtool() -> Path:
    binary = PROMTOOL_DIR / "usr" / "bin" / "promtool"
    if not binary.exists():
        try:
            with tempfile.TemporaryDirectory() as download:
                subprocess.run(["apt-get", "download", "prometheus"], cwd=download, check=True, capture_output=True, timeout=300)
                [deb] = Path(download).glob("prometheus_*.deb")
                PROMTOOL_DIR.mkdir(parents=True, exist_ok=True)
                subprocess.run(["dpkg-deb", "-x", str(deb), str(PROMTOOL_DIR)], check=True, capture_output=True, timeout=300)
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            stderr = getattr(error, "stderr", None)
            reason = f"promtool (Debian's prometheus package) could not be had: {stderr.decode(errors='replace') if stderr else error}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
    return binary


def test_alert_rules_pass_promtool(promtool):
    result = subprocess.run([str(promtool), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_the_rules_cover_saturation_kv_cache_restarts_and_ttft():
    rules = {rule["alert"]: rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    queried = {name: metric_names(expr) for name, expr in rules.items()}
    assert "shardgate_responses_total" in queried["ShardgateQueueSaturated"]
    assert "shardgate_kv_cache_usage_ratio" in queried["ShardgateKVCacheNearlyFull"]
    assert "shardgate_replica_restarts_total" in queried["ShardgateReplicaRestarted"]
    assert "gen_ai_server_time_to_first_token_seconds_bucket" in queried["ShardgateTimeToFirstTokenSLO"]


def test_every_series_the_dashboard_and_rules_query_is_served(tmp_path):
    metrics_port = free_port()
    server = start_server(tmp_path, "--metrics-port", str(metrics_port), "--kv-cache-memory", str(16 << 20))
    try:
        with server.client() as client:
            client.generate("monitor me", max_new_tokens=3, ignore_eos=True)
            list(client.stream("and me", max_new_tokens=3, ignore_eos=True))
            client.embed(["embed me"])
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    finally:
        server.stop()
    served = {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}
    queried = {name for expr in rule_expressions() + dashboard_expressions() for name in metric_names(expr)}
    assert len(queried) > 20
    assert sorted(queried - served) == []
