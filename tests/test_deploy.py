"""deploy/: the dashboard and the alert rules use exactly the metrics the worker exports, and promtool accepts them.

A renamed metric would leave a dashboard panel empty and an alert silent without a
single error anywhere; these tests make that rename fail here instead.
"""

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inspector.config import MetricsSettings
from inspector.worker.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "inspector.json"
RULES = DEPLOY / "prometheus" / "inspector-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "inspector-rules.test.yml"
SCRAPE_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DATASOURCE = "${datasource}"

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "offset", "atmodifier", "inf", "nan"}  # fmt: skip
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus; .ci/run installs it)"
)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: not functions, keywords, label names, durations or numbers."""
    label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.DOTALL)
    if label_values:  # a Grafana variable query: only its first argument is PromQL
        expr = label_values.group(1)
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        name = match.group()
        following = expr[match.end() :].lstrip()
        if following.startswith("(") or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def exported_names() -> set[str]:
    """Every sample name a worker's /metrics can hold, read from a real scrape: prometheus_client's
    process and Python collectors included, as Prometheus will see them."""
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0))
    metrics.frame_done(line="l", camera="c", model="m", verdict="fail", probability=0.9, latency_s=0.1,
                       queue_wait_s=0.05, redelivered=True)  # fmt: skip
    metrics.set_model("m", "dfkde", "v1", 0.5)
    metrics.model_reload("m", "success")
    metrics.batch("m", 4)
    port = metrics.serve()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        names.update(family_names(family))  # a family with no series yet (GPU memory on a CPU machine)
    return names


def family_names(family) -> set[str]:
    """The sample names a family declares, whether or not it has samples now."""
    if family.type == "counter":
        return {family.name + "_total"}
    if family.type == "histogram":
        return {family.name + suffix for suffix in ("", "_bucket", "_sum", "_count")}
    return {family.name}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and variable query."""
    board = dashboard()
    queries = [(f"panel {p['title']!r}", t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    queries += [(f"annotation {a['name']!r}", a["expr"]) for a in board["annotations"]["list"] if "expr" in a]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append((f"variable {variable['name']!r}", query["query"] if isinstance(query, dict) else query))
    return queries


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_metric_names_are_found_in_promql():
    expr = (
        "histogram_quantile(0.95, sum by (le, stage) "
        '(rate(inspector_stage_seconds_bucket{stage=~"$x"}[$__rate_interval])))'
        " / on (job) group_left (model) max(a_metric offset 5m) > 1e-9 and bool line:x:rate5m"
    )
    assert metric_names(expr) == {"inspector_stage_seconds_bucket", "a_metric", "line:x:rate5m"}
    assert metric_names('label_values(inspector_frames_total{line=~"$line"}, camera)') == {"inspector_frames_total"}


def test_dashboard_and_rules_use_only_exported_metrics():
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    exported = exported_names()
    used = [(where, expr) for where, expr in dashboard_queries()]
    used += [(rule.get("alert") or rule["record"], rule["expr"]) for rule in rules()]
    unknown, read = [], set()
    for where, expr in used:
        for name in metric_names(expr) - recorded:
            read.add(name)
            if name not in exported and name != "up" and not name.startswith("rabbitmq_"):
                unknown.append(f"{where}: {name}")
    assert not unknown, "metrics the worker does not export:\n" + "\n".join(unknown)
    # not vacuous: the deploy files read the contract's metrics and the process's own
    assert {"inspector_frames_total", "inspector_model_info", "inspector_broker_connected"} <= read
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds"} <= read


def test_dashboard_imports_with_a_datasource_choice_and_label_filters():
    board = dashboard()
    assert board["uid"] and board["title"]
    assert board["schemaVersion"] >= 38
    assert any(i["type"] == "datasource" and i["pluginId"] == "prometheus" for i in board["__inputs"])
    assert any(r["id"] == "grafana" for r in board["__requires"])
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("line", "camera", "model"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["multi"] and variable["includeAll"], name
        assert variable["datasource"]["uid"] == DATASOURCE
        assert "label_values(inspector_frames_total" in variable["query"]["query"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]
            assert "$__interval" not in target["expr"] and "[5m]" not in target["expr"], panel["title"]


def test_every_alert_tells_the_operator_what_to_do():
    alerts = [rule for rule in rules() if "alert" in rule]
    for alert in alerts:
        assert alert["labels"]["severity"] in ("critical", "warning"), alert["alert"]
        assert alert["annotations"]["summary"] and len(alert["annotations"]["description"]) > 80, alert["alert"]
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert {alert["alert"] for alert in alerts} <= tested


@needs_promtool
def test_promtool_accepts_the_rules_and_their_tests_pass():
    commands = (["check", "rules", RULES], ["test", "rules", RULE_TESTS], ["check", "config", SCRAPE_CONFIG])
    for command in commands:
        result = subprocess.run([PROMTOOL, *map(str, command)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"promtool {' '.join(map(str, command))}:\n{result.stdout}\n{result.stderr}"


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    """Grafana shows a PromQL syntax error only when the panel is opened; promtool checks them all now."""
    grafana_vars = {"$__rate_interval": "5m", "$line": ".*", "$camera": ".*", "$model": ".*"}
    checks = []
    for index, (where, expr) in enumerate(dashboard_queries()):
        label_values = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", expr, re.DOTALL)
        expr = label_values.group(1) if label_values else expr
        for variable, value in grafana_vars.items():
            expr = expr.replace(variable, value)
        checks.append({"record": f"dashboard_query_{index}", "expr": expr, "labels": {"where": where}})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": checks}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
