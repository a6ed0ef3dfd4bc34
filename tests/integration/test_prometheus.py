"""The alert rules, the Grafana dashboard and the PodMonitor of deploy/ against a real Prometheus
scraping real servers with the labels the Prometheus Operator gives the shipped PodMonitor.

- promtool validates the rules and the config, and runs tests/prometheus/alerts_test.yml (each
  alert fires after its `for:` on its condition and stays silent otherwise); broken copies of the
  rules must fail those unit tests.
- Three sidecars (healthy with a workload, one with its arena pool filled past 90% by managed
  shared-memory sessions, one that is killed) are scraped through the operator's relabelings
  (operator_podmonitor.py): the alert's own selector up{job="reasonalloc"} must find them,
  ReasonAllocSidecarDown and ReasonAllocArenaNearlyFull must go pending for the right pod, and the
  healthy one must stay silent. The PodMonitor without jobLabel is scraped by a second Prometheus
  to show the alert would never match it.
- Every dashboard panel is evaluated like Grafana (grafana_panels.py) and its numbers are compared
  with what the servers report and what the workload did.

Needs Debian's `prometheus` package (scripts/setup installs it)."""
import math
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import grafana_panels  # noqa: E402
import operator_podmonitor  # noqa: E402
import prom_stack  # noqa: E402
from prom_stack import LAYERS, KV_HEADS, NAMESPACE  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
ALERTS = os.path.join(REPO, "deploy", "prometheus", "alerts.yml")
CONFIG = os.path.join(REPO, "deploy", "prometheus", "prometheus.yml")
ALERT_TESTS = os.path.join(REPO, "tests", "prometheus", "alerts_test.yml")

POD_HEALTHY = "reasonalloc-worker-5c9d7b8f6d-hl7qz"
POD_FULL = "reasonalloc-worker-5c9d7b8f6d-fz2mk"
POD_DOWN = "reasonalloc-worker-5c9d7b8f6d-dn4wp"
LATENCY_BUCKETS = [1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3,
                   5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
SPREAD_BUCKETS = [1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0]


def alert_rules():
    return {r["alert"]: r for g in yaml.safe_load(open(ALERTS))["groups"] for r in g["rules"]}


def alert_queries():
    """The query part of each alert: the rule files write "<query> <op> <number>"."""
    out = []
    for name, rule in alert_rules().items():
        m = re.match(r"^(.*\S)\s*(==|!=|>=|<=|>|<)\s*[-+0-9.eE]+\s*$", rule["expr"].strip())
        assert m, f"{name}: expression is not '<query> <op> <number>': {rule['expr']}"
        out.append((name, m.group(1)))
    return out


def bucket_index(value, bounds):
    return next((i for i, b in enumerate(bounds) if value <= b), len(bounds))


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        pytest.fail("prometheus/promtool not installed: run scripts/setup")
    tmp = str(tmp_path_factory.mktemp("prom"))
    pb, grpc_mod, types_pb2 = prom_stack.compile_stubs(os.environ["REASONALLOC_PROTO_DIR"],
                                                      os.path.join(tmp, "stubs"))
    binary = os.environ["REASONALLOC_SERVER_BINARY"]
    profiles = os.path.join(tmp, "profiles")
    prom_stack.write_profile(profiles)
    sidecars = []

    def sidecar(name, *flags):
        sidecars.append(prom_stack.Sidecar(binary, tmp, name, pb, grpc_mod, flags))
        return sidecars[-1]

    try:
        healthy = sidecar("healthy", f"--profile_dir={profiles}", "--max_arena_bytes=1073741824")
        full = sidecar("full", "--max_arena_bytes=1048576")
        down = sidecar("down")
        filled = prom_stack.fill_arena(full, types_pb2)
        workload = prom_stack.Workload(healthy, types_pb2).start()

        podmonitor, template = operator_podmonitor.load_manifests()
        pods = {POD_HEALTHY: healthy.metrics_port, POD_FULL: full.metrics_port, POD_DOWN: down.metrics_port}
        shutil.copy(ALERTS, os.path.join(tmp, "alerts.yml"))
        prom = prom_stack.Prometheus(os.path.join(tmp, "prom"),
                                     prom_stack.operator_jobs(podmonitor, template, pods),
                                     rule_files=[os.path.join(tmp, "alerts.yml")])
        # The PodMonitor as it was shipped before it set jobLabel, scraping the healthy pod.
        old = prom_stack.Prometheus(os.path.join(tmp, "prom-old"), prom_stack.operator_jobs(
            operator_podmonitor.without_job_label(podmonitor), template, {POD_HEALTHY: healthy.metrics_port}))
    except BaseException:
        for s in sidecars:
            s.proc.kill()
        raise
    s = SimpleNamespace(prom=prom, old=old, healthy=healthy, full=full, down=down, filled=filled,
                        workload=workload, podmonitor=podmonitor, template=template, pb=pb,
                        started=time.time(), tmp=tmp)
    yield s
    workload.stop()
    prom.stop()
    old.stop()
    assert healthy.stop() == 0
    assert full.stop() == 0
    down.stop()


def settle(stack, seconds=20):
    """Rates over [1m] need a few scrapes; ratios of counters need more."""
    wait = stack.started + seconds - time.time()
    if wait > 0:
        time.sleep(wait)


def instance(sidecar):
    return f"127.0.0.1:{sidecar.metrics_port}"


# --- promtool -------------------------------------------------------------------------------------

def test_promtool_accepts_rules_and_config():
    subprocess.run(["promtool", "check", "rules", ALERTS], check=True)
    subprocess.run(["promtool", "check", "config", CONFIG], check=True)


def test_alert_rule_unit_tests_pass_and_cover_every_alert():
    r = subprocess.run(["promtool", "test", "rules", ALERT_TESTS], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    tests = yaml.safe_load(open(ALERT_TESTS))["tests"]
    fires, silent = set(), set()
    for group in tests:
        for case in group["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
            for alert in case["exp_alerts"]:
                # The operator's labels, as produced by the shipped PodMonitor.
                labels = alert["exp_labels"]
                if "job" in labels:
                    assert labels["job"] == "reasonalloc" and labels["endpoint"] == "metrics"
    assert fires == set(alert_rules()) and silent == set(alert_rules()), (fires, silent)


def _run_unit_tests_against(tmp_path, rules_text):
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_text)
    tests = yaml.safe_load(open(ALERT_TESTS))
    tests["rule_files"] = [str(rules)]
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True)


@pytest.mark.parametrize("alert", sorted(alert_rules()))
def test_alert_rule_unit_tests_catch_a_short_for(tmp_path, alert):
    """With `for: 15s` each alert fires too early and during a spell shorter than its real `for:`:
    the unit tests must notice both."""
    rules = yaml.safe_load(open(ALERTS))
    for g in rules["groups"]:
        for r in g["rules"]:
            if r["alert"] == alert:
                r["for"] = "15s"
    r = _run_unit_tests_against(tmp_path, yaml.safe_dump(rules))
    assert r.returncode != 0
    failed_groups = re.findall(r"name: (.*),\n\s+alertname: (\S+),", r.stdout + r.stderr)
    assert {n for n, a in failed_groups if a == alert and "silent" in n}, r.stdout + r.stderr
    assert {n for n, a in failed_groups if a == alert and "fire" in n}, r.stdout + r.stderr


def test_alert_rule_unit_tests_catch_the_default_operator_job(tmp_path):
    text = open(ALERTS).read().replace('up{job="reasonalloc"}', f'up{{job="{NAMESPACE}/reasonalloc"}}')
    r = _run_unit_tests_against(tmp_path, text)
    assert r.returncode != 0 and "ReasonAllocSidecarDown" in r.stdout + r.stderr


# --- PodMonitor -> scrape config ------------------------------------------------------------------

def test_podmonitor_job_label_names_the_alerts_job():
    podmonitor, template = operator_podmonitor.load_manifests()
    job_label = podmonitor["spec"].get("jobLabel")
    assert job_label, "the PodMonitor sets no jobLabel: the operator would name the job <namespace>/<name>"
    alert_job = re.search(r'up\{job="([^"]+)"\}', alert_rules()["ReasonAllocSidecarDown"]["expr"]).group(1)
    assert template["metadata"]["labels"].get(job_label) == alert_job
    for key, value in podmonitor["spec"]["selector"]["matchLabels"].items():
        assert template["metadata"]["labels"].get(key) == value


def test_translation_without_job_label_names_the_job_after_the_namespace():
    podmonitor, template = operator_podmonitor.load_manifests()
    targets = operator_podmonitor.pod_targets(template, namespace=NAMESPACE, pod_name=POD_HEALTHY,
                                              pod_ip="10.0.0.12")
    for pm, job in ((podmonitor, "reasonalloc"),
                    (operator_podmonitor.without_job_label(podmonitor), f"{NAMESPACE}/reasonalloc")):
        rl = operator_podmonitor.scrape_configs(pm, NAMESPACE, targets)[0]["relabel_configs"]
        writes = [r for r in rl if r.get("target_label") == "job"]
        assert writes[0] == {"target_label": "job", "replacement": f"{NAMESPACE}/reasonalloc"}
        if job == "reasonalloc":
            assert writes[1]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
            assert targets[0][writes[1]["source_labels"][0]] == job
        else:
            assert len(writes) == 1


def test_operator_labels_reach_prometheus(stack):
    deadline = time.time() + 20
    while True:
        targets = stack.prom.api("/api/v1/targets")
        active = {t["labels"].get("pod"): t for t in targets["activeTargets"]}
        if len(active) == 3 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert set(active) == {POD_HEALTHY, POD_FULL, POD_DOWN}
    for pod, sidecar in ((POD_HEALTHY, stack.healthy), (POD_FULL, stack.full), (POD_DOWN, stack.down)):
        assert active[pod]["labels"] == {"job": "reasonalloc", "namespace": NAMESPACE, "pod": pod,
                                         "container": "reasonalloc", "endpoint": "metrics",
                                         "instance": instance(sidecar)}, active[pod]["labels"]
        print(f"{pod}: {active[pod]['labels']}")
    # The pod's other containers have no "metrics" port: the operator's keep rule drops them.
    spec = stack.template["spec"]
    others = {c["name"] for c in spec.get("initContainers", []) + spec["containers"]
              if "metrics" not in {p.get("name") for p in c.get("ports", [])}}
    assert "worker" in others
    dropped = [t["discoveredLabels"] for t in targets["droppedTargets"]]
    assert {d.get("__meta_kubernetes_pod_container_name") for d in dropped} == others
    # The alert's own selector.
    up = stack.prom.wait_for('up{job="reasonalloc"}', lambda r: len(r) == 3)
    assert {s["metric"]["pod"] for s in up} == {POD_HEALTHY, POD_FULL, POD_DOWN}


def test_without_job_label_the_alert_selector_finds_nothing(stack):
    up = stack.old.wait_for("up")
    assert [s["metric"]["job"] for s in up] == [f"{NAMESPACE}/reasonalloc"], up
    print("without jobLabel:", up[0]["metric"])
    assert stack.old.query('up{job="reasonalloc"}') == []


# --- alerts on live servers -----------------------------------------------------------------------

def test_every_dashboard_and_alert_expression_returns_data(stack):
    variables = {"instance": ".*", "model": ".*"}
    exprs = [("dashboard", p["title"], grafana_panels.instantiate(t["expr"], variables))
             for p in grafana_panels.load_dashboard()["panels"] for t in p["targets"]]
    exprs += [("alert", n, e) for n, e in alert_queries()]
    assert len(exprs) >= 18
    empty = [f"{kind} {name}: {e}" for kind, name, e in exprs if not stack.prom.wait_for(e, timeout=40)]
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def test_alert_rules_load_and_evaluate(stack):
    def rules():
        return {r["name"]: r for g in stack.prom.api("/api/v1/rules")["groups"] for r in g["rules"]}
    deadline = time.time() + 20
    while any(r.get("health") != "ok" for r in rules().values()) and time.time() < deadline:
        time.sleep(1)
    loaded = rules()
    assert set(loaded) == set(alert_rules())
    assert all(r["health"] == "ok" for r in loaded.values()), loaded
    # Nothing can have fired yet: every `for:` is longer than this test runs.
    assert not [r["name"] for r in loaded.values() if r["state"] == "firing"]


def wait_alert(prom, name, pod, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [a for a in prom.alerts() if a["labels"]["alertname"] == name and a["labels"].get("pod") == pod]
        if found:
            return found[0]
        time.sleep(0.5)
    return None


def test_arena_nearly_full_goes_pending_for_the_full_sidecar_only(stack):
    reserved = sum(s.reserved_bytes for s in stack.full.sessions())
    capacity = stack.full.info.arena_capacity_bytes
    assert len(stack.filled) > 1 and reserved / capacity > 0.9, (reserved, capacity)
    alert = wait_alert(stack.prom, "ReasonAllocArenaNearlyFull", POD_FULL)
    assert alert is not None, stack.prom.alerts()
    assert alert["state"] == "pending"
    assert alert["labels"]["job"] == "reasonalloc" and alert["labels"]["instance"] == instance(stack.full)
    assert math.isclose(float(alert["value"]), reserved / capacity, rel_tol=1e-9)
    print("ArenaNearlyFull:", alert["state"], alert["labels"], alert["value"])
    assert not [a for a in stack.prom.alerts() if a["labels"].get("pod") == POD_HEALTHY]


def test_sidecar_down_goes_pending_when_the_sidecar_dies(stack):
    assert wait_alert(stack.prom, "ReasonAllocSidecarDown", POD_DOWN, timeout=3) is None
    stack.down.kill()
    alert = wait_alert(stack.prom, "ReasonAllocSidecarDown", POD_DOWN)
    assert alert is not None, stack.prom.alerts()
    assert alert["state"] == "pending"
    assert alert["labels"] == {"alertname": "ReasonAllocSidecarDown", "severity": "critical",
                               "job": "reasonalloc", "namespace": NAMESPACE, "pod": POD_DOWN,
                               "container": "reasonalloc", "endpoint": "metrics",
                               "instance": instance(stack.down)}, alert["labels"]
    print("SidecarDown:", alert["state"], alert["labels"])
    others = [a for a in stack.prom.alerts() if a["labels"]["alertname"] == "ReasonAllocSidecarDown"
              and a["labels"]["pod"] != POD_DOWN]
    assert not others


def test_healthy_sidecar_stays_silent(stack):
    settle(stack)
    inst = instance(stack.healthy)
    # The error-rate query has data for it and it is 0: its one error per round is NOT_FOUND.
    query = dict(alert_queries())["ReasonAllocErrorRate"]
    result = [s for s in stack.prom.query(query) if s["metric"]["instance"] == inst]
    assert len(result) == 1 and float(result[0]["value"][1]) == 0.0, result
    assert not [a for a in stack.prom.alerts() if a["labels"].get("instance") == inst]


# --- dashboard ------------------------------------------------------------------------------------

def panel(title):
    return next(p for p in grafana_panels.load_dashboard()["panels"] if p["title"] == title)


def values_by(frames, label):
    return {f["fields"][1]["labels"].get(label): f["fields"][1]["values"][-1] for f in frames}


@pytest.fixture(scope="module")
def healthy_view(stack):
    """Panels of the healthy sidecar (instance variable = its instance, all models)."""
    settle(stack, 25)
    return {"instance": instance(stack.healthy), "model": ".*"}


def test_request_and_error_panels_see_the_workload(stack, healthy_view):
    at = time.time()
    requests = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Requests per second by method"),
                                                       healthy_view, at=at), "method")
    errors = grafana_panels.evaluate_panel(stack.prom, panel("Errors per second by method and code"),
                                           healthy_view, at=at)
    # One error per round, and only that one.
    assert [f["name"] for f in errors] == ["Compress NOT_FOUND"], [f["name"] for f in errors]
    error_rate = errors[0]["fields"][1]["values"][-1]
    # Three Compress calls per round (two sessions, one unknown), one of them the error.
    assert requests["Compress"] > 0 and math.isclose(error_rate / requests["Compress"], 1 / 3, abs_tol=0.03), \
        (error_rate, requests)
    # rate() over [1m] divides by the whole minute; before the first scrape nothing was counted.
    rounds = [t for t in stack.workload.rounds if max(at - 60, stack.prom.ready) < t <= at]
    client_rate = len(rounds) / 60
    assert 0.6 < error_rate / client_rate < 1.5, (error_rate, client_rate)


def test_latency_panels_match_the_servers_timings(stack, healthy_view):
    at = time.time()
    p50 = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Compress latency p50 by stage"),
                                                  healthy_view, at=at), "stage")
    p99 = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Compress latency p99 by stage"),
                                                  healthy_view, at=at), "stage")
    assert set(p50) == set(p99) == {"score", "allocate", "select", "compact", "total"}
    for stage in p50:
        assert 0 <= p50[stage] <= p99[stage], (stage, p50[stage], p99[stage])
    # The server's own timings of the same events (CompressResponse.timings).
    totals = [r.timings.total_seconds for r in stack.workload.events_since(at - 60)]
    true_p50 = median(totals)
    assert abs(bucket_index(p50["total"], LATENCY_BUCKETS) - bucket_index(true_p50, LATENCY_BUCKETS)) <= 1, \
        (p50["total"], true_p50)
    assert p50["total"] > 0


def test_pool_panels_match_the_servers(stack):
    settle(stack)
    for sidecar in (stack.healthy, stack.full):
        view = {"instance": instance(sidecar), "model": ".*"}
        sessions = sidecar.sessions()
        frames = grafana_panels.evaluate_panel(stack.prom, panel("Sessions"), view)
        assert [f["fields"][1]["values"][-1] for f in frames] == [len(sessions)]
        arena = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Arena bytes by state"), view), "state")
        reserved = sum(s.reserved_bytes for s in sessions)
        capacity = sidecar.info.arena_capacity_bytes
        assert arena == {"capacity": capacity, "reserved": reserved, "free": capacity - reserved}, arena
        fraction = grafana_panels.evaluate_panel(stack.prom, panel("Arena reserved fraction"), view)
        assert math.isclose(fraction[0]["fields"][1]["values"][-1], reserved / capacity, rel_tol=1e-9)
        tokens = values_by(grafana_panels.evaluate_panel(stack.prom, panel("KV tokens held"), view), "state")
        kept = sum(sum(s.kept_lengths) for s in sessions)
        cap = sum(s.model.num_layers * s.model.num_kv_heads * (s.budget.budget + s.budget.buffer)
                  for s in sessions)
        assert tokens == {"kept": kept, "capacity": cap}, (tokens, kept, cap)
    # With every sidecar selected the gauge still shows each one: the full pool is not averaged away.
    gauges = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Arena reserved fraction"), {
        "instance": ".*", "model": ".*"}), "instance")
    assert gauges[instance(stack.full)] > 0.9 and gauges[instance(stack.healthy)] < 0.01, gauges


def test_policy_panels_match_the_decisions(stack, healthy_view):
    at = time.time()
    evicted = grafana_panels.evaluate_panel(stack.prom, panel("Tokens evicted per second by policy"),
                                            healthy_view, at=at)
    evicted = {f["name"]: f["fields"][1]["values"][-1] for f in evicted}
    assert set(evicted) == {"snapkv × uniform", "rkv × reasonalloc"}, evicted
    errors = grafana_panels.evaluate_panel(stack.prom, panel("Errors per second by method and code"),
                                           healthy_view, at=at)
    round_rate = errors[0]["fields"][1]["values"][-1]
    kept_fraction = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Kept fraction at events"),
                                                            healthy_view, at=at), "model")
    for name, (model, _, _) in zip(("snapkv × uniform", "rkv × reasonalloc"), prom_stack.POLICIES):
        events = stack.workload.events_since(at - 60, model)
        per_event = sum(r.decision.evicted_tokens for r in events) / len(events)
        # One event of each session per round.
        assert math.isclose(evicted[name] / round_rate, per_event, rel_tol=0.05), (name, evicted[name], round_rate)
        kept = sum(sum(r.decision.kept_lengths) for r in events)
        expected = kept / (kept + sum(r.decision.evicted_tokens for r in events))
        assert math.isclose(kept_fraction[model], expected, rel_tol=0.02), (model, kept_fraction[model], expected)


def test_head_spread_panel_matches_the_decisions(stack, healthy_view):
    at = time.time()
    spread = values_by(grafana_panels.evaluate_panel(stack.prom, panel("Head budget spread (median max/min)"),
                                                     healthy_view, at=at), "allocator")
    assert set(spread) == {"uniform", "reasonalloc"}
    for (model, _, allocator) in prom_stack.POLICIES:
        ratios = [max(r.decision.budgets) / min(r.decision.budgets)
                  for r in stack.workload.events_since(at - 60, model)]
        true_median = median(ratios)
        if allocator == "uniform":
            assert true_median == 1.0 and spread[allocator] == 1.0, (true_median, spread)
        else:
            assert spread[allocator] >= 1.0
            assert abs(bucket_index(spread[allocator], SPREAD_BUCKETS)
                       - bucket_index(true_median, SPREAD_BUCKETS)) <= 1, (spread[allocator], true_median)


def test_watch_panel_sees_the_one_watcher(stack, healthy_view):
    frames = grafana_panels.evaluate_panel(stack.prom, panel("WatchMetrics streams and drops"), healthy_view)
    values = {f["name"]: f["fields"][1]["values"][-1] for f in frames}
    assert values == {"watchers": 1, "dropped/s": 0}, values
    assert stack.workload.watch_events > 0


def test_layer_budget_panel_is_an_instant_table_in_numeric_layer_order(stack, healthy_view):
    p = panel("Per-layer budget share (latest event)")
    assert all(t.get("instant") is True and t.get("range") is False and t.get("format") == "table"
               for t in p["targets"])
    view = dict(healthy_view, model=prom_stack.PROFILED_MODEL)
    raw = grafana_panels.query_panel(stack.prom, p, view)
    frames = grafana_panels.transform(raw, p["transformations"])
    assert len(frames) == 1
    layers = grafana_panels.column(frames[0], "layer")
    shares = grafana_panels.column(frames[0], "share")
    assert layers == list(range(LAYERS)), layers
    # What the server says: GetSession's per-layer budgets of the model's session.
    sid = stack.workload.sessions[prom_stack.PROFILED_MODEL]
    info = stack.healthy.stub.GetSession(stack.pb.GetSessionRequest(session_id=sid))
    expected = [b / sum(info.layer_budgets) for b in info.layer_budgets]
    assert len(expected) == LAYERS
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(shares, expected)), (shares, expected)
    # The profile's demand rises with depth: so do the shares, and not all of them are equal.
    assert shares == sorted(shares) and shares[0] < shares[-1]
    # The same data sorted without the number conversion comes out in string order (0, 1, 10, ...).
    sort_only = [t for t in p["transformations"] if t["id"] != "convertFieldType"]
    string_order = grafana_panels.column(grafana_panels.transform(raw, sort_only)[0], "layer")
    assert string_order[:4] == ["0", "1", "10", "11"], string_order
    # Per-layer sums of the latest decision's head budgets agree.
    last = stack.workload.events_since(0, prom_stack.PROFILED_MODEL)[-1].decision
    per_layer = [sum(last.budgets[layer * KV_HEADS:(layer + 1) * KV_HEADS]) for layer in range(LAYERS)]
    assert all(math.isclose(a, b / sum(per_layer), rel_tol=1e-9) for a, b in zip(shares, per_layer))


def test_dashboard_variables_and_metric_names(stack):
    dash = grafana_panels.load_dashboard()
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model", "instance"} <= names
    models = stack.prom.api("/api/v1/label/model/values")
    assert {m for m, _, _ in prom_stack.POLICIES} <= set(models)
    instances = stack.prom.api("/api/v1/label/instance/values")
    assert instance(stack.healthy) in instances
