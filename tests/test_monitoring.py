"""Tests of the Grafana dashboard and the Prometheus alert rules, against a real Prometheus.

The main test runs a worker that trains on a small stream in the session's
Tansu broker and redis-server, and Prometheus scrapes it every second. The test
then evaluates every query of the dashboard and of the alert rules through the
HTTP query API. The other tests run promtool: a syntax check of deploy/alerts.yml,
and unit tests that feed synthetic series to each alert.

Prometheus and promtool come from Debian's ``prometheus`` package
(``apt-get install prometheus``). Without them the tests fail under CI (the CI
environment variable is set) and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from streamer.app import build_worker
from streamer.datasets import Message, synthetic_interactions
from streamer.embedded import ManagedProcess, _spawn, create_topic, free_port
from streamer.metrics import WorkerMetrics
from tests.helpers import produce, to_messages, worker_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_PATH = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "drnn-stream.json"
ALERTS_PATH = REPO_ROOT / "deploy" / "alerts.yml"
SCRAPE_JOB = "drnn-worker"
DATASOURCE_UID = "prometheus"
INSTALL_HINT = "install Debian's prometheus package: apt-get update && apt-get install -y prometheus"

# Grafana replaces $__rate_interval by at least 4 scrape intervals; the test
# Prometheus scrapes every second, so 15 s covers about 15 samples.
GRAFANA_VARIABLES = {"$__rate_interval": "15s"}

EVENTS = 400
INVALID_MESSAGES = [Message(b"u1", b"{not json"), Message(b"u2", b'{"user_id": "u2"}')]
START_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 60.0

COMPARISON_OPERATORS = ("==", "!=", ">=", "<=", ">", "<")
SET_OPERATORS = ("and", "or", "unless")
NUMBER = re.compile(r"[0-9]+(\.[0-9]+)?")
ABSENT_CALL = re.compile(r"absent\((.*)\)", re.DOTALL)
METRIC_NAME = re.compile(r"\b(drnn_[a-z0-9_]+)")


def prometheus_tool(name: str) -> str:
    """Return the path of ``prometheus`` or ``promtool``; fail under CI and skip elsewhere when it is missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path is not None:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing, and CI must run the monitoring tests: {INSTALL_HINT}")
    pytest.skip(f"{name} is missing: {INSTALL_HINT}")


# The queries under test.


def dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    """Return every PromQL query of the dashboard, with Grafana's variables replaced."""
    queries = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            query = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                query = query.replace(variable, value)
            queries.append(query)
    return queries


def alert_rules() -> list[dict]:
    document = yaml.safe_load(ALERTS_PATH.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _strip_parentheses(expr: str) -> str:
    """Remove parentheses that enclose the whole expression."""
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")") and _closing_paren(expr, 0) == len(expr) - 1:
        expr = expr[1:-1].strip()
    return expr


def _closing_paren(expr: str, start: int) -> int:
    depth = 0
    for position in range(start, len(expr)):
        if expr[position] == "(":
            depth += 1
        elif expr[position] == ")":
            depth -= 1
            if depth == 0:
                return position
    return -1


def _top_level_split(expr: str) -> list[str] | None:
    """Split ``expr`` at its first comparison or set operator outside brackets, quotes and braces; None if it has none."""
    depth = 0
    quote = None
    position = 0
    while position < len(expr):
        char = expr[position]
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            for operator in SET_OPERATORS:
                end = position + len(operator)
                if (expr.startswith(operator, position) and expr[position - 1:position].isspace()
                        and end < len(expr) and (expr[end].isspace() or expr[end] == "(")):
                    return [expr[:position], expr[end:]]
            for operator in COMPARISON_OPERATORS:
                if expr.startswith(operator, position):
                    return [expr[:position], expr[position + len(operator):]]
        position += 1
    return None


def operands(expr: str) -> list[str]:
    """Return the queries whose data an alert expression compares.

    An alert expression returns data only while the alert fires, so the test
    checks its operands instead: the sides of every comparison and set
    operator outside brackets, with ``absent(x)`` replaced by ``x`` and number
    literals left out.
    """
    expr = _strip_parentheses(expr)
    parts = _top_level_split(expr)
    if parts is None:
        absent = ABSENT_CALL.fullmatch(expr)
        if absent:
            return [absent.group(1).strip()]
        return [] if NUMBER.fullmatch(expr) else [expr]
    return [query for part in parts for query in operands(part)]


def rule_queries() -> list[str]:
    return [query for rule in alert_rules() for query in operands(rule["expr"])]


# Prometheus on a loopback port.


class PrometheusServer:
    """A prometheus process with a parent-death signal, scraping one target, stopped by PID."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS_PATH)],
            "scrape_configs": [{"job_name": SCRAPE_JOB, "static_configs": [{"targets": [target]}]}],
        }
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        command = [
            prometheus_tool("prometheus"),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        log_path = tmp_path / "prometheus.log"
        self.process = ManagedProcess(
            name="prometheus", popen=_spawn("prometheus", command, log_path), port=self.port,
            url=self.url, log_path=log_path, stop_signal=signal.SIGTERM,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process.is_running(), f"prometheus exited: {self.process.log_tail()}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready after {START_TIMEOUT_S} s: {self.process.log_tail()}"
            time.sleep(0.1)

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            return json.loads(error.read())

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def wait_for_value(self, expr: str, minimum: float) -> None:
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while True:
            result = self.query(expr).get("data", {}).get("result", [])
            if result and float(result[0]["value"][1]) >= minimum:
                return
            assert time.monotonic() < deadline, f"{expr} stayed below {minimum} for {SCRAPE_TIMEOUT_S} s: {result}"
            time.sleep(0.5)

    def wait_rules_evaluated(self) -> list[dict]:
        deadline = time.monotonic() + SCRAPE_TIMEOUT_S
        while True:
            groups = self.api("rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(rule["health"] != "unknown" for rule in rules):
                return rules
            assert time.monotonic() < deadline, f"rules not evaluated within {SCRAPE_TIMEOUT_S} s: {rules}"
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def scraped_worker(broker, redis_server, topic_factory, group_id, key_prefix, tmp_path):
    """A worker that has trained on a small stream and keeps running, scraped every second by Prometheus."""
    prometheus_tool("prometheus")
    topic = topic_factory(2)
    metrics_address = f"127.0.0.1:{free_port()}"
    settings = worker_settings(
        broker=broker, redis_url=redis_server.url, topic=topic, group_id=group_id, key_prefix=key_prefix,
        checkpoint_dir=tmp_path / "checkpoints", metrics_address=metrics_address,
    )
    create_topic(broker, settings.dead_letter_topic, 1)
    interactions = synthetic_interactions(users=20, items=40, events=EVENTS, seed=11)
    produce(broker, topic, to_messages(interactions) + INVALID_MESSAGES)

    prometheus = PrometheusServer(tmp_path, metrics_address)
    worker = build_worker(settings, registry=CollectorRegistry())
    thread = threading.Thread(target=worker.run, name="monitored-worker", daemon=True)
    try:
        prometheus.wait_ready()
        thread.start()
        yield prometheus
    finally:
        worker.request_stop()
        thread.join(30)
        prometheus.stop()


# Every query returns data from a real worker.


def test_monitoring_queries_return_data(scraped_worker):
    prometheus = scraped_worker
    prometheus.wait_for_value("drnn_events_consumed_total", EVENTS + len(INVALID_MESSAGES))
    prometheus.wait_for_value("count_over_time(drnn_events_consumed_total[15s])", 5)
    rules = prometheus.wait_rules_evaluated()

    # A rate over 1h or 24h needs only two samples inside the window, so the
    # few seconds of samples scraped here are enough for the drift alert's 24-hour
    # average too. The alert expressions themselves return data only while they
    # fire, so their operands are queried instead (see operands()).
    queries = dashboard_queries() + rule_queries()
    failed = {}
    for query in queries:
        response = prometheus.query(query)
        if response.get("status") != "success" or not response["data"]["result"]:
            failed[query] = response
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}

    assert not failed, f"{len(failed)} of {len(queries)} queries returned no data: {json.dumps(failed, indent=1)}"
    assert not unhealthy, f"alert rules failed to evaluate: {unhealthy}"


# Static checks of the dashboard and the rules.


def test_dashboard_queries_name_exported_metrics():
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    exported = set()
    for family in registry.collect():
        exported.add(family.name)
        exported.update(sample.name for sample in family.samples)
    exported.update(f"{family.name}_bucket" for family in registry.collect() if family.type == "histogram")

    used = {name for query in dashboard_queries() + rule_queries() for name in METRIC_NAME.findall(query)}

    assert used - exported == set(), f"queries name metrics that the worker does not export: {used - exported}"


def test_dashboard_queries_use_known_variables():
    for query in dashboard_queries():
        assert "$" not in query, f"query uses a Grafana variable the tests do not replace: {query}"


def test_dashboard_panels_use_provisioned_datasource():
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == DATASOURCE_UID, f"panel {panel['title']!r} uses another data source"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, f"a query of {panel['title']!r} uses another data source"


def test_dashboard_panel_ids_unique():
    ids = [panel["id"] for panel in dashboard()["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"


def test_dashboard_panels_do_not_overlap():
    cells = {}
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r} at x={x}, y={y}"
                cells[(x, y)] = panel["title"]


def test_dashboard_panels_fit_grid_width():
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than Grafana's 24 columns"


@pytest.mark.parametrize(
    "title, metric",
    [
        ("Consumer lag by partition", "drnn_consumer_lag_messages"),
        ("Stage latency p50", "drnn_batch_stage_seconds_bucket"),
        ("Stage latency p99", "drnn_batch_stage_seconds_bucket"),
        ("BPR loss", "drnn_bpr_loss_total"),
        ("BPR loss", "drnn_bpr_loss_batch_mean"),
        ("Prequential HR@10 and MRR@10", "drnn_prequential_hits_at_10_total"),
        ("Prequential HR@10 and MRR@10", "drnn_prequential_reciprocal_rank_at_10_total"),
        ("Prequential HR@10 and MRR@10", "drnn_prequential_sample_every"),
        ("Skipped, invalid and dead-letter rate", "drnn_events_invalid_total"),
        ("Known users and items", "drnn_known_users"),
        ("Checkpoint age", "drnn_checkpoint_age_seconds"),
        ("Errors by component", "drnn_errors_total"),
    ],
)
def test_dashboard_panel_shows_metric(title, metric):
    panels = {panel["title"]: panel for panel in dashboard_panels()}
    assert title in panels, f"the dashboard has no panel {title!r}"

    exprs = " ".join(target["expr"] for target in panels[title]["targets"])
    assert metric in exprs, f"panel {title!r} does not query {metric}"


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('up{job="w"} == 0 or absent(up{job="w"})', ['up{job="w"}', 'up{job="w"}']),
        ("(sum(a) / sum(b)) < 0.5 * (sum(c)) and sum(d) > 1000", ["sum(a) / sum(b)", "0.5 * (sum(c))", "sum(d)"]),
        ('x{reason=~"a|b"} >= 2', ['x{reason=~"a|b"}']),
        ("rate(x[5m])", ["rate(x[5m])"]),
    ],
)
def test_operands_split_alert_expressions(expr, expected):
    assert [query.strip() for query in operands(expr)] == expected


# promtool.


def test_alert_rules_pass_promtool_check():
    result = subprocess.run(
        [prometheus_tool("promtool"), "check", "rules", str(ALERTS_PATH)], capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, f"promtool check rules failed:\n{result.stdout}\n{result.stderr}"


def alert_unit_tests() -> list[dict]:
    """promtool unit tests: series that must fire each alert, and healthy series that must not."""
    worker = {"job": SCRAPE_JOB, "instance": "worker:9400"}
    labels = 'job="drnn-worker",instance="worker:9400"'
    return [
        {
            "interval": "1m",
            "input_series": [{"series": f"up{{{labels}}}", "values": "1 1 0 0 0 0 0"}],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "DrnnWorkerDown", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "DrnnWorkerDown", "exp_alerts": [{"exp_labels": {"severity": "critical", **worker}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": f"drnn_worker_ready{{{labels}}}", "values": "1 1 1"}],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "DrnnWorkerDown", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "DrnnWorkerDown", "exp_alerts": [{"exp_labels": {"severity": "critical", "job": SCRAPE_JOB}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": f"drnn_worker_ready{{{labels}}}", "values": "1 0x10"}],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "DrnnWorkerNotReady", "exp_alerts": []},
                {"eval_time": "8m", "alertname": "DrnnWorkerNotReady", "exp_alerts": [{"exp_labels": {"severity": "warning", **worker}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f'drnn_consumer_lag_messages{{{labels},topic="t",partition="0"}}', "values": "0+200x30"},
                {"series": f'drnn_consumer_lag_messages{{{labels},topic="steady",partition="0"}}', "values": "5000x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DrnnConsumerLagGrowing", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "DrnnConsumerLagGrowing", "exp_alerts": [{"exp_labels": {"severity": "warning", "topic": "t"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f'drnn_events_trained_total{{{labels},outcome="sgd_step"}}', "values": "0+100x5 500x10"},
                {"series": f"drnn_events_consumed_total{{{labels}}}", "values": "0+100x15"},
            ],
            "alert_rule_test": [
                {"eval_time": "5m", "alertname": "DrnnNoTraining", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "DrnnNoTraining", "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f'drnn_events_trained_total{{{labels},outcome="sgd_step"}}', "values": "500x15"},
                {"series": f"drnn_events_consumed_total{{{labels}}}", "values": "500x15"},
            ],
            "alert_rule_test": [
                {"eval_time": "12m", "alertname": "DrnnNoTraining", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f'drnn_events_invalid_total{{{labels},reason="not_json"}}', "values": "0+5x30"},
                {"series": f'drnn_events_invalid_total{{{labels},reason="empty"}}', "values": "0x30"},
                {"series": f"drnn_events_consumed_total{{{labels}}}", "values": "0+100x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "8m", "alertname": "DrnnDeadLetterRateHigh", "exp_alerts": []},
                {"eval_time": "20m", "alertname": "DrnnDeadLetterRateHigh", "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f'drnn_events_invalid_total{{{labels},reason="not_json"}}', "values": "0+0.5x30"},
                {"series": f"drnn_events_consumed_total{{{labels}}}", "values": "0+100x30"},
            ],
            "alert_rule_test": [
                {"eval_time": "20m", "alertname": "DrnnDeadLetterRateHigh", "exp_alerts": []},
            ],
        },
        {
            # HR@10 is 0.5 for 22 hours, then 0.05: the last hour is far below half of the 24-hour average.
            "interval": "1m",
            "input_series": [
                {"series": f"drnn_prequential_evaluated_total{{{labels}}}", "values": "0+100x1500"},
                {"series": f"drnn_prequential_hits_at_10_total{{{labels}}}", "values": "0+50x1320 66005+5x180"},
            ],
            "alert_rule_test": [
                {"eval_time": "22h", "alertname": "DrnnHitRateDrift", "exp_alerts": []},
                {"eval_time": "24h", "alertname": "DrnnHitRateDrift", "exp_alerts": [{"exp_labels": {"severity": "warning"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                {"series": f"drnn_prequential_evaluated_total{{{labels}}}", "values": "0+100x1500"},
                {"series": f"drnn_prequential_hits_at_10_total{{{labels}}}", "values": "0+30x1500"},
            ],
            "alert_rule_test": [
                {"eval_time": "24h", "alertname": "DrnnHitRateDrift", "exp_alerts": []},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": f"drnn_checkpoint_age_seconds{{{labels}}}", "values": "0+60x40"}],
            "alert_rule_test": [
                {"eval_time": "30m", "alertname": "DrnnCheckpointStale", "exp_alerts": []},
                {"eval_time": "40m", "alertname": "DrnnCheckpointStale", "exp_alerts": [{"exp_labels": {"severity": "warning", **worker}}]},
            ],
        },
    ]


def test_alert_rules_fire_on_synthetic_series(tmp_path):
    # promtool compares annotations too; they are templates of the values, so
    # this copy of the rules leaves them out and the tests check labels only.
    rules = yaml.safe_load(ALERTS_PATH.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = tmp_path / "alerts.yml"
    rules_path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    tests_path = tmp_path / "alerts_test.yml"
    tests_path.write_text(
        yaml.safe_dump({"rule_files": [str(rules_path)], "evaluation_interval": "1m", "tests": alert_unit_tests()}),
        encoding="utf-8",
    )

    result = subprocess.run(
        [prometheus_tool("promtool"), "test", "rules", str(tests_path)], capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, f"promtool test rules failed:\n{result.stdout}\n{result.stderr}"


def test_alert_unit_tests_cover_every_alert():
    tested = {case["alertname"] for test in alert_unit_tests() for case in test["alert_rule_test"] if case["exp_alerts"]}

    assert tested == {rule["alert"] for rule in alert_rules()}
