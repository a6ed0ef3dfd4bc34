"""What the Prometheus Operator makes of deploy/k8s's PodMonitor, for a Prometheus without Kubernetes.

The operator turns each podMetricsEndpoints[i] of a PodMonitor into one scrape job with
kubernetes_sd_configs (role: pod) and a fixed list of relabel_configs. This module rebuilds that
job from the manifests, following ConfigGenerator.generatePodMonitorConfig in the operator's
pkg/prometheus/promcfg.go (github.com/prometheus-operator/prometheus-operator):

  job_name   podMonitor/<namespace>/<name>/<i>
  relabel    job -> __tmp_prometheus_job_name
             drop __meta_kubernetes_pod_phase =~ (Failed|Succeeded)       (filterRunning unset/true)
             keep __meta_kubernetes_pod_label_<k>;__meta_kubernetes_pod_labelpresent_<k> =~ (<v>);true
                  for each selector.matchLabels key, sorted (matchExpressions likewise)
             keep __meta_kubernetes_pod_container_port_name =~ <port>
             namespace <- __meta_kubernetes_namespace
             container <- __meta_kubernetes_pod_container_name
             pod       <- __meta_kubernetes_pod_name
             <l>       <- __meta_kubernetes_pod_label_<l>                  (each podTargetLabels)
             job       =  "<namespace>/<name>"
             job       <- __meta_kubernetes_pod_label_<jobLabel> (regex (.+))  (only with jobLabel)
             endpoint  =  <port>
             <the endpoint's own relabelings>
             hashmod __address__ into __tmp_hash, keep __tmp_hash == $(SHARD)    (shard 0 of 1 here)

Label names are sanitized as the operator does ([^a-zA-Z0-9_] -> _). Instead of Kubernetes service
discovery the job gets static_configs whose targets carry the __meta_kubernetes_* labels that
Kubernetes SD gives a pod's containers (one target per container port, one per container without
ports; see Prometheus' discovery/kubernetes/pod.go). Labels starting with "__" are visible to
relabel_configs and dropped afterwards, so Prometheus applies the operator's relabelings to them
exactly as it would to discovered pods.
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import zlib

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(REPO, "deploy", "k8s")


def sanitize(name):
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _kubectl():
    candidate = os.path.join(os.path.dirname(sys.executable), "kubectl")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("kubectl")


def load_manifests(overlay="cpu"):
    """(PodMonitor, pod template) of the shipped manifests.

    Rendered with kustomize (kubectl kustomize deploy/k8s/overlays/<overlay>) when kubectl is at
    hand; otherwise read raw from deploy/k8s/base with the base kustomization's labels applied the
    way kustomize applies them (metadata labels everywhere, and, with includeSelectors, the
    selectors and the pod template)."""
    kubectl = _kubectl()
    if kubectl:
        out = subprocess.run([kubectl, "kustomize", os.path.join(K8S, "overlays", overlay)],
                             check=True, capture_output=True, text=True).stdout
        docs = [d for d in yaml.safe_load_all(out) if d]
    else:
        base = os.path.join(K8S, "base")
        kust = yaml.safe_load(open(os.path.join(base, "kustomization.yaml")))
        docs = [d for r in kust["resources"] for d in yaml.safe_load_all(open(os.path.join(base, r))) if d]
        for entry in kust.get("labels", []):
            for doc in docs:
                doc["metadata"].setdefault("labels", {}).update(entry["pairs"])
                if entry.get("includeSelectors"):
                    if doc["kind"] == "Deployment":
                        doc["spec"]["selector"]["matchLabels"].update(entry["pairs"])
                        doc["spec"]["template"]["metadata"].setdefault("labels", {}).update(entry["pairs"])
                    elif doc["kind"] == "PodMonitor":
                        doc["spec"]["selector"].setdefault("matchLabels", {}).update(entry["pairs"])
    podmonitor = next(d for d in docs if d["kind"] == "PodMonitor")
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    return podmonitor, deployment["spec"]["template"]


def pod_targets(template, *, namespace, pod_name, pod_ip, port_numbers=None, node="node-1"):
    """The targets Kubernetes SD (role: pod) gives one running pod made from `template`.

    port_numbers maps a port name to the port actually listened on (a test server binds a free
    port; in a cluster it is the containerPort)."""
    port_numbers = port_numbers or {}
    labels = template["metadata"].get("labels", {})
    annotations = template["metadata"].get("annotations", {})
    pod = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod_name,
        "__meta_kubernetes_pod_ip": pod_ip,
        "__meta_kubernetes_pod_ready": "true",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_node_name": node,
        "__meta_kubernetes_pod_host_ip": "192.0.2.10",
        "__meta_kubernetes_pod_uid": "00000000-0000-0000-0000-%012x" % zlib.crc32(pod_name.encode()),
        "__meta_kubernetes_pod_controller_kind": "ReplicaSet",
        "__meta_kubernetes_pod_controller_name": pod_name.rsplit("-", 1)[0],
    }
    for k, v in labels.items():
        pod["__meta_kubernetes_pod_label_" + sanitize(k)] = str(v)
        pod["__meta_kubernetes_pod_labelpresent_" + sanitize(k)] = "true"
    for k, v in annotations.items():
        pod["__meta_kubernetes_pod_annotation_" + sanitize(k)] = str(v)
        pod["__meta_kubernetes_pod_annotationpresent_" + sanitize(k)] = "true"
    targets = []
    spec = template["spec"]
    for init, containers in (("true", spec.get("initContainers", [])), ("false", spec.get("containers", []))):
        for c in containers:
            base = dict(pod, **{
                "__meta_kubernetes_pod_container_name": c["name"],
                "__meta_kubernetes_pod_container_image": str(c.get("image", "")),
                "__meta_kubernetes_pod_container_init": init,
            })
            if not c.get("ports"):
                targets.append(dict(base, __address__=pod_ip))
            for p in c.get("ports", []):
                number = port_numbers.get(p.get("name"), p["containerPort"])
                t = dict(base, **{
                    "__address__": f"{pod_ip}:{number}",
                    "__meta_kubernetes_pod_container_port_number": str(number),
                    "__meta_kubernetes_pod_container_port_protocol": p.get("protocol", "TCP"),
                })
                if p.get("name"):
                    t["__meta_kubernetes_pod_container_port_name"] = p["name"]
                targets.append(t)
    return targets


def _selector_relabelings(selector):
    out = []
    for k in sorted(selector.get("matchLabels", {})):
        out.append({"action": "keep",
                    "source_labels": ["__meta_kubernetes_pod_label_" + sanitize(k),
                                      "__meta_kubernetes_pod_labelpresent_" + sanitize(k)],
                    "regex": f"({selector['matchLabels'][k]});true"})
    for exp in selector.get("matchExpressions", []):
        key, op = sanitize(exp["key"]), exp["operator"]
        if op in ("In", "NotIn"):
            out.append({"action": "keep" if op == "In" else "drop",
                        "source_labels": ["__meta_kubernetes_pod_label_" + key,
                                          "__meta_kubernetes_pod_labelpresent_" + key],
                        "regex": "(%s);true" % "|".join(exp.get("values", []))})
        elif op in ("Exists", "DoesNotExist"):
            out.append({"action": "keep" if op == "Exists" else "drop",
                        "source_labels": ["__meta_kubernetes_pod_labelpresent_" + key],
                        "regex": "true"})
    return out


_RELABEL_KEYS = {"sourceLabels": "source_labels", "targetLabel": "target_label",
                 "replacement": "replacement", "regex": "regex", "separator": "separator",
                 "modulus": "modulus", "action": "action"}


def scrape_configs(podmonitor, namespace, targets, shard=0, shards=1):
    """The scrape jobs the operator generates for `podmonitor` applied in `namespace`, with
    `targets` (from pod_targets) in static_configs instead of kubernetes_sd_configs."""
    name, spec = podmonitor["metadata"]["name"], podmonitor["spec"]
    jobs = []
    for i, ep in enumerate(spec.get("podMetricsEndpoints", [])):
        job = {"job_name": f"podMonitor/{namespace}/{name}/{i}",
               "honor_labels": bool(ep.get("honorLabels", False))}
        if "honorTimestamps" in ep:
            job["honor_timestamps"] = ep["honorTimestamps"]
        job["static_configs"] = [{"targets": [t["__address__"]],
                                  "labels": {k: v for k, v in t.items() if k != "__address__"}}
                                 for t in targets]
        for src, dst in (("interval", "scrape_interval"), ("scrapeTimeout", "scrape_timeout"),
                         ("path", "metrics_path"), ("params", "params"), ("scheme", "scheme")):
            if ep.get(src):
                job[dst] = ep[src]
        rl = [{"source_labels": ["job"], "target_label": "__tmp_prometheus_job_name"}]
        if ep.get("filterRunning", True):
            rl.append({"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"],
                       "regex": "(Failed|Succeeded)"})
        rl += _selector_relabelings(spec["selector"])
        if ep.get("port"):
            rl.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                       "regex": ep["port"]})
        elif ep.get("portNumber"):
            rl.append({"action": "keep", "source_labels": ["__meta_kubernetes_pod_container_port_number"],
                       "regex": str(ep["portNumber"])})
        rl += [{"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
               {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
               {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"}]
        for label in spec.get("podTargetLabels", []):
            rl.append({"source_labels": ["__meta_kubernetes_pod_label_" + sanitize(label)],
                       "target_label": sanitize(label), "regex": "(.+)", "replacement": "${1}"})
        rl.append({"target_label": "job", "replacement": f"{namespace}/{name}"})
        if spec.get("jobLabel"):
            rl.append({"source_labels": ["__meta_kubernetes_pod_label_" + sanitize(spec["jobLabel"])],
                       "target_label": "job", "regex": "(.+)", "replacement": "${1}"})
        if ep.get("port"):
            rl.append({"target_label": "endpoint", "replacement": ep["port"]})
        elif ep.get("portNumber"):
            rl.append({"target_label": "endpoint", "replacement": str(ep["portNumber"])})
        for r in ep.get("relabelings", []):
            rl.append({_RELABEL_KEYS.get(k, k): v for k, v in r.items()})
        # The operator writes regex "$(SHARD)"; its config reloader substitutes the shard number.
        rl += [{"source_labels": ["__address__"], "target_label": "__tmp_hash", "modulus": shards,
                "action": "hashmod"},
               {"source_labels": ["__tmp_hash"], "regex": str(shard), "action": "keep"}]
        job["relabel_configs"] = rl
        jobs.append(job)
    return jobs


def without_job_label(podmonitor):
    """A copy of the PodMonitor as shipped before it set jobLabel."""
    pm = copy.deepcopy(podmonitor)
    pm["spec"].pop("jobLabel", None)
    return pm
