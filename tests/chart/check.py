#!/usr/bin/env python3
"""The accordion Helm chart's tests (run by scripts/chart-test.sh, i.e. `make chart-test`).

For each case (values files in this directory) it renders charts/accordion with Helm's own engine
(helm_template.py), then
  - validates every object against Kubernetes' OpenAPI schemas for 1.33, 1.34 and 1.35, strictly
    (an unknown field fails), with kubernetes-validate, and runs `helm lint --strict` for them;
  - asserts what users and the installer rely on: the RuntimeClass, the installer's exact command,
    config.toml (parsed as TOML, every key one that docs/configuration.md documents), RBAC, labels,
    volumes, probe, NOTES.txt.
Bad values must make rendering fail with the chart's own `fail` message. values.yaml must have a
comment above every key and the README's values table must list every key with its default.
Last, a mutation self-test: each kind of check is shown to fail on a deliberately broken render.

Prints one line per case; exits 1 if anything failed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

import kubernetes_validate
import yaml

import helm_template

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CHART = os.path.join(ROOT, "charts", "accordion")
K8S_VERSIONS = ["1.33", "1.34", "1.35"]
OUT = os.environ.get("CHART_TEST_OUT")  # where to leave the rendered manifests, if set

STD_LABELS = {
    "helm.sh/chart": "accordion-0.1.0",
    "app.kubernetes.io/name": "accordion",
    "app.kubernetes.io/version": "0.1.0",
    "app.kubernetes.io/managed-by": "Helm",
}
CLUSTER_ROLE_RULES = [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
PROBE = ["/accordion/bin/accordion", "install", "--check", "--root", "/host"]


def installer_command(config_path: str, version: str, restart: str, label: str, uninstall: bool) -> list[str]:
    cmd = [
        "/accordion/bin/accordion", "install",
        "--root", "/host",
        "--source", "/accordion",
        "--config", "/etc/accordion-chart/config.toml",
        "--containerd-config", config_path,
        "--containerd-version", version,
        "--restart", restart,
        "--node-label", label,
        "--wait",
    ]
    return cmd + (["--uninstall-on-exit"] if uninstall else [])


@dataclass
class Case:
    name: str
    files: list[str]
    release: str
    namespace: str
    expect: dict[str, Any]


DEFAULT_EXPECT: dict[str, Any] = {
    "fullname": "accordion",
    "serviceAccount": "accordion",
    "serviceAccountCreated": True,
    "objects": {"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "RuntimeClass"},
    "image": "localhost/accordion-installer:0.1.0",
    "pullPolicy": "IfNotPresent",
    "imagePullSecrets": None,
    "runtimeClass": {
        "name": "accordion",
        "handler": "accordion",
        "overhead": {"podFixed": {"cpu": "250m", "memory": "160Mi"}},
        "scheduling": {"nodeSelector": {"accordion.dev/installed": "true"}},
    },
    "runtimeClassName": "accordion",
    "command": installer_command("/etc/containerd/config.toml", "auto", "systemd", "accordion.dev/installed", True),
    "config": {
        "log_level": "info",
        "vcpus": {"default": 1, "min": 1, "max": 8, "sizing_policy": "limits-then-requests"},
        "memory": {"default_mib": 512, "max_mib": 0},
    },
    "nodeSelector": {"kubernetes.io/arch": "arm64"},
    "tolerations": None,
    "affinity": None,
    "priorityClassName": "system-node-critical",
    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
    "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
    "podLabels": {},
    "podAnnotations": {},
    "metricsPort": None,
    "notes": ["runtimeClassName: accordion", "--subresource resize", '"cpu":"4"', "-- nproc",
              'requests: {cpu: "1", memory: 256Mi}', "nproc                               # 1\n",
              "cat /sys/devices/system/cpu/online  # 0-3", "rollout status daemonset/accordion"],
}


def _with(**kw: Any) -> dict[str, Any]:
    e = copy.deepcopy(DEFAULT_EXPECT)
    e.update(kw)
    return e


CASES = [
    Case("default", [], "accordion", "kube-system", DEFAULT_EXPECT),
    Case("custom", ["custom.yaml"], "edge", "microvm", _with(
        fullname="edge-accordion",
        serviceAccount="accordion-installer",
        image="registry.example.com/platform/accordion-installer:0.2.0-rc.1",
        pullPolicy="Always",
        imagePullSecrets=[{"name": "regcred"}],
        runtimeClass={
            "name": "microvm",
            "handler": "accordion-edge",
            "overhead": {"podFixed": {"cpu": "500m", "memory": "192Mi"}},
            "scheduling": {
                "nodeSelector": {"example.com/accordion-ready": "true"},
                "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "microvm", "effect": "NoSchedule"}],
            },
        },
        runtimeClassName="microvm",
        command=installer_command("/etc/containerd/conf.d/accordion.toml", "2", "none", "example.com/accordion-ready", False),
        config={
            "log_level": "debug",
            "guest": {"kernel_params": 'console=hvc0 quiet foo="a b"'},
            "vcpus": {"default": 2, "min": 1, "max": 16, "sizing_policy": "requests"},
            "memory": {"default_mib": 1024, "max_mib": 4096},
        },
        nodeSelector={"kubernetes.io/arch": "arm64", "node-role.example.com/microvm": "true"},
        tolerations=[{"operator": "Exists"}],
        priorityClassName=None,
        resources={"requests": {"cpu": "20m", "memory": "48Mi"}, "limits": {"memory": "256Mi"}},
        updateStrategy={"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}},
        podLabels={"example.com/tier": "node"},
        podAnnotations={"example.com/team": "platform"},
        objects={"ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "RuntimeClass",
                 "Service"},
        metricsPort=9100,
        notes=["runtimeClassName: microvm", "--subresource resize", "-- nproc", "# 0-3",
               "containerd.restart=none", "kubectl get nodes -l example.com/accordion-ready=true"],
    )),
    Case("no-runtimeclass", ["no-runtimeclass.yaml"], "accordion", "accordion-system", _with(
        fullname="microvm-installer",
        serviceAccount="node-installer",
        serviceAccountCreated=False,
        objects={"ConfigMap", "ClusterRole", "ClusterRoleBinding", "DaemonSet"},
        runtimeClass=None,
        runtimeClassName="accordion",
        command=installer_command("/etc/containerd/config.toml", "1", "systemd", "accordion.dev/installed", True),
        config={
            "log_level": "info",
            "vcpus": {"default": 1, "min": 1, "max": 2, "sizing_policy": "limits-then-requests"},
            "memory": {"default_mib": 512, "max_mib": 0},
        },
        nodeSelector=None,
        notes=["created no RuntimeClass", "handler: accordion", "runtimeClassName: accordion",
               "Resize it in place to 2 CPUs", '"cpu":"2"', "# 0-1"],
    )),
]

# Values the chart must refuse, and the message its `fail` must give.
BAD = [
    ("vcpus.max 600", {"guest": {"vcpus": {"max": 600}}},
     "accordion: guest.vcpus.max must be at most 512, got 600"),
    ("vcpus.default > max", {"guest": {"vcpus": {"default": 9, "max": 8}}},
     "accordion: guest.vcpus.default (9) must be between guest.vcpus.min (1) and guest.vcpus.max (8)"),
    ("vcpus.min > max", {"guest": {"vcpus": {"min": 4, "default": 4, "max": 2}}},
     "accordion: guest.vcpus.min (4) must not exceed guest.vcpus.max (2)"),
    ("vcpus.min 0", {"guest": {"vcpus": {"min": 0}}},
     "accordion: guest.vcpus.min must be at least 1, got 0"),
    ("vcpus.max 2.5", {"guest": {"vcpus": {"max": 2.5}}},
     "accordion: guest.vcpus.max must be a whole number, got 2.5"),
    ("vcpus.default \"two\"", {"guest": {"vcpus": {"default": "two"}}},
     "accordion: guest.vcpus.default must be a whole number, got two"),
    ("memoryMiB 64", {"guest": {"memoryMiB": 64}},
     "accordion: guest.memoryMiB must be at least 128, got 64"),
    ("maxMemoryMiB -1", {"guest": {"maxMemoryMiB": -1}},
     "accordion: guest.maxMemoryMiB must be 0 to 1048576, got -1"),
    ("sizingPolicy bogus", {"guest": {"sizingPolicy": "bogus"}},
     'accordion: guest.sizingPolicy must be one of limits-then-requests, limits, requests, got "bogus"'),
    ("containerd.version 3", {"containerd": {"version": 3}},
     'accordion: containerd.version must be one of auto, 1, 2, got "3"'),
    ("containerd.restart reboot", {"containerd": {"restart": "reboot"}},
     'accordion: containerd.restart must be one of systemd, none, got "reboot"'),
    ("containerd.configPath relative", {"containerd": {"configPath": "etc/containerd/config.toml"}},
     'accordion: containerd.configPath must be an absolute path, got "etc/containerd/config.toml"'),
    ("logLevel loud", {"logLevel": "loud"},
     'accordion: logLevel must be one of error, warn, info, debug, trace, got "loud"'),
    ("nodeLabel empty", {"nodeLabel": ""}, "accordion: nodeLabel must not be empty"),
    ("metrics.port 0", {"metrics": {"port": 0}}, "accordion: metrics.port must be 1 to 65535, got 0"),
    ("metrics.port 70000", {"metrics": {"port": 70000}}, "accordion: metrics.port must be 1 to 65535, got 70000"),
]


class Checks:
    """Collects named checks; a failed one records what was expected and what was found."""

    def __init__(self) -> None:
        self.count = 0
        self.failures: list[str] = []

    def ok(self, what: str, cond: bool, detail: str = "") -> None:
        self.count += 1
        if not cond:
            self.failures.append(f"{what}{': ' + detail if detail else ''}")

    def eq(self, what: str, got: Any, want: Any) -> None:
        self.ok(what, got == want, f"got {json.dumps(got, sort_keys=True)}, want {json.dumps(want, sort_keys=True)}")


def parse_manifest(manifest: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest) if d]


def check_schemas(ck: Checks, docs: list[dict[str, Any]]) -> None:
    for d in docs:
        what = f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        for v in K8S_VERSIONS:
            try:
                used = kubernetes_validate.validate(d, v, strict=True)
                ck.eq(f"schema {v} strict: {what}: validated against", used, v)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                ck.ok(f"schema {v} strict: {what}", False, f"{path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                ck.ok(f"schema {v} strict: {what}", False, e.message)


def documented_config_keys() -> set[str]:
    """The keys of docs/configuration.md's table: `vcpus.default`, `log_level`, ..."""
    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        return set(re.findall(r"^\| `([a-z_.]+)` \|", f.read(), re.M))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_render(ck: Checks, case: Case, docs: list[dict[str, Any]], notes: str) -> None:
    e = case.expect
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind", "?"), []).append(d)
    ck.eq("objects rendered (kinds)", sorted(k for k in by_kind), sorted(e["objects"]))
    ck.eq("one object of each kind", sorted(len(v) for v in by_kind.values()), [1] * len(by_kind))
    one = {k: v[0] for k, v in by_kind.items()}

    for d in docs:
        meta = d.get("metadata") or {}
        what = f"{d.get('kind')}/{meta.get('name')}"
        labels = meta.get("labels") or {}
        ck.eq(f"{what}: standard labels",
              {k: labels.get(k) for k in list(STD_LABELS) + ["app.kubernetes.io/instance"]},
              {**STD_LABELS, "app.kubernetes.io/instance": case.release})
        if d.get("kind") in ("ServiceAccount", "ConfigMap", "DaemonSet"):
            ck.eq(f"{what}: namespace", meta.get("namespace"), case.namespace)

    # RuntimeClass
    rc = one.get("RuntimeClass")
    if e["runtimeClass"] is None:
        ck.ok("no RuntimeClass", rc is None)
    else:
        want = e["runtimeClass"]
        ck.ok("RuntimeClass rendered", rc is not None)
        rc = rc or {}
        ck.eq("RuntimeClass name", rc.get("metadata", {}).get("name"), want["name"])
        ck.eq("RuntimeClass handler", rc.get("handler"), want["handler"])
        ck.eq("RuntimeClass overhead", rc.get("overhead"), want["overhead"])
        ck.eq("RuntimeClass scheduling", rc.get("scheduling"), want["scheduling"])
        label = e["command"][e["command"].index("--node-label") + 1]
        ck.eq("RuntimeClass scheduling.nodeSelector is {nodeLabel: \"true\"}",
              (rc.get("scheduling") or {}).get("nodeSelector"), {label: "true"})
        ck.eq("RuntimeClass apiVersion", rc.get("apiVersion"), "node.k8s.io/v1")

    # RBAC
    cr = one.get("ClusterRole", {})
    ck.eq("ClusterRole rules: exactly nodes get/patch", cr.get("rules"), CLUSTER_ROLE_RULES)
    crb = one.get("ClusterRoleBinding", {})
    ck.eq("ClusterRoleBinding roleRef", crb.get("roleRef"),
          {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cr.get("metadata", {}).get("name")})
    ck.eq("ClusterRoleBinding subjects", crb.get("subjects"),
          [{"kind": "ServiceAccount", "name": e["serviceAccount"], "namespace": case.namespace}])
    sa = one.get("ServiceAccount")
    if e["serviceAccountCreated"]:
        ck.eq("ServiceAccount name", (sa or {}).get("metadata", {}).get("name"), e["serviceAccount"])
    else:
        ck.ok("no ServiceAccount created", sa is None)

    # ConfigMap / config.toml
    cm = one.get("ConfigMap", {})
    ck.eq("ConfigMap name", cm.get("metadata", {}).get("name"), f"{e['fullname']}-config")
    ck.eq("ConfigMap keys", sorted((cm.get("data") or {}).keys()), ["config.toml"])
    text = (cm.get("data") or {}).get("config.toml", "")
    try:
        config = tomllib.loads(text)
        ck.ok("config.toml parses as TOML", True)
    except tomllib.TOMLDecodeError as err:
        config = {}
        ck.ok("config.toml parses as TOML", False, str(err))
    ck.eq("config.toml values", config, e["config"])
    undocumented = sorted(set(flatten(config)) - documented_config_keys())
    ck.eq("config.toml keys documented in docs/configuration.md", undocumented, [])

    # DaemonSet
    ds = one.get("DaemonSet", {})
    ck.eq("DaemonSet name", ds.get("metadata", {}).get("name"), e["fullname"])
    spec = ds.get("spec") or {}
    tmpl = spec.get("template") or {}
    pod = tmpl.get("spec") or {}
    tlabels = (tmpl.get("metadata") or {}).get("labels") or {}
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    ck.ok("DaemonSet selector matches its pod labels", bool(sel) and all(tlabels.get(k) == v for k, v in sel.items()),
          f"selector {sel}, labels {tlabels}")
    ck.eq("DaemonSet pod labels include podLabels", {k: tlabels.get(k) for k in e["podLabels"]}, e["podLabels"])
    annotations = (tmpl.get("metadata") or {}).get("annotations") or {}
    ck.eq("DaemonSet pod annotations include podAnnotations",
          {k: annotations.get(k) for k in e["podAnnotations"]}, e["podAnnotations"])
    ck.ok("DaemonSet pod annotation checksum/config", re.fullmatch(r"[0-9a-f]{64}", str(annotations.get("checksum/config"))) is not None)
    ck.eq("DaemonSet updateStrategy", spec.get("updateStrategy"), e["updateStrategy"])
    ck.eq("pod serviceAccountName", pod.get("serviceAccountName"), e["serviceAccount"])
    ck.eq("pod hostPID", pod.get("hostPID"), False)
    ck.eq("pod terminationGracePeriodSeconds", pod.get("terminationGracePeriodSeconds"), 120)
    ck.eq("pod priorityClassName", pod.get("priorityClassName"), e["priorityClassName"])
    ck.eq("pod nodeSelector", pod.get("nodeSelector"), e["nodeSelector"])
    ck.eq("pod tolerations", pod.get("tolerations"), e["tolerations"])
    ck.eq("pod affinity", pod.get("affinity"), e["affinity"])
    ck.eq("pod imagePullSecrets", pod.get("imagePullSecrets"), e["imagePullSecrets"])
    containers = pod.get("containers") or []
    port = e["metricsPort"]
    ck.eq("containers: installer (and metrics when enabled)", [c.get("name") for c in containers],
          ["installer"] + (["metrics"] if port else []))
    check_metrics(ck, e, one, containers[1] if len(containers) > 1 else None)
    c = containers[0] if containers else {}
    ck.eq("installer image", c.get("image"), e["image"])
    ck.eq("installer imagePullPolicy", c.get("imagePullPolicy"), e["pullPolicy"])
    ck.eq("installer command", c.get("command"), e["command"])
    ck.eq("installer args", c.get("args"), None)
    ck.eq("installer env", c.get("env"),
          [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    ck.eq("installer securityContext", c.get("securityContext"), {"privileged": True})
    ck.eq("installer readinessProbe", c.get("readinessProbe"), {"exec": {"command": PROBE}, "periodSeconds": 10})
    ck.eq("installer resources", c.get("resources"), e["resources"])
    mounts = {m.get("name"): m for m in c.get("volumeMounts") or []}
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    ck.eq("volume names", sorted(volumes), ["config", "host"])
    ck.eq("host volume", volumes.get("host"), {"name": "host", "hostPath": {"path": "/", "type": "Directory"}})
    ck.eq("host mount", {k: v for k, v in (mounts.get("host") or {}).items() if k != "mountPropagation"},
          {"name": "host", "mountPath": "/host"})
    ck.eq("config volume", volumes.get("config"),
          {"name": "config", "configMap": {"name": cm.get("metadata", {}).get("name")}})
    ck.eq("config mount", mounts.get("config"), {"name": "config", "mountPath": "/etc/accordion-chart", "readOnly": True})
    ck.ok("the command's --config is in the config mount",
          "/etc/accordion-chart/config.toml" in (c.get("command") or []))

    # NOTES.txt
    for s in e["notes"]:
        ck.ok(f"NOTES has {s!r}", s in notes)


def check_metrics(ck: Checks, e: dict[str, Any], one: dict[str, Any], m: dict[str, Any] | None) -> None:
    """The metrics container and its Service, when metrics.enabled."""
    port = e["metricsPort"]
    svc = one.get("Service")
    if not port:
        ck.ok("no metrics container and no Service", m is None and svc is None)
        return
    m = m or {}
    ck.eq("metrics image", m.get("image"), e["image"])
    ck.eq("metrics command", m.get("command"),
          ["/accordion/bin/accordion", "metrics", "--listen", f"0.0.0.0:{port}", "--proc", "/host/proc"])
    ck.eq("metrics env", m.get("env"), [{"name": "ACCORDION_RUN_DIR", "value": "/host/run/accordion"}])
    ck.eq("metrics ports", m.get("ports"), [{"name": "metrics", "containerPort": port, "protocol": "TCP"}])
    ck.eq("metrics securityContext (root, no capabilities, read-only)", m.get("securityContext"),
          {"runAsUser": 0, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
           "capabilities": {"drop": ["ALL"]}})
    ck.eq("metrics host mount read-only", m.get("volumeMounts"),
          [{"name": "host", "mountPath": "/host", "readOnly": True, "mountPropagation": "HostToContainer"}])
    ck.eq("metrics resources", m.get("resources"),
          {"requests": {"cpu": "5m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
    svc = svc or {}
    ck.eq("metrics Service name", svc.get("metadata", {}).get("name"), f"{e['fullname']}-metrics")
    spec = svc.get("spec") or {}
    ck.eq("metrics Service headless", spec.get("clusterIP"), "None")
    ck.eq("metrics Service port", spec.get("ports"),
          [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}])
    ds = one.get("DaemonSet", {})
    labels = ((ds.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
    sel = spec.get("selector") or {}
    ck.ok("metrics Service selects the installer pods", bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
          f"selector {sel}, labels {labels}")


def check_lint(ck: Checks, values: dict[str, Any]) -> None:
    for v in K8S_VERSIONS:
        problems = helm_template.lint(CHART, values, f"v{v}.0")
        ck.eq(f"helm lint --strict --kube-version {v}", problems, [])


def check_bad(ck: Checks, name: str, values: dict[str, Any], message: str) -> None:
    try:
        helm_template.render(CHART, values)
        ck.ok(f"bad values {name}: rendering fails", False, "it rendered")
    except helm_template.RenderError as err:
        ck.ok(f"bad values {name}: fails with {message!r}", message in str(err), f"got {str(err)!r}")


# ---- values.yaml and README -------------------------------------------------------------------

def check_values_docs(ck: Checks) -> int:
    path = os.path.join(CHART, "values.yaml")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keys = 0
    prev = ""
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("-") and re.match(r"^\s*[\"']?[A-Za-z0-9_./-]+[\"']?:(\s|$)", line):
            keys += 1
            ck.ok(f"values.yaml:{n}: comment above {s.split(':')[0]}", prev.startswith("#"))
        if s:
            prev = s
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    with open(os.path.join(CHART, "README.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", f.read(), re.M)
    table = {k: d for k, d in rows}
    ck.ok("README values table found", len(table) > 10, f"{len(table)} rows")

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            p = prefix + k
            if p in table:
                try:
                    ck.eq(f"README default of {p} (got: README, want: values.yaml)", json.loads(table[p]), v)
                except json.JSONDecodeError:
                    ck.ok(f"README default of {p} is JSON", False, table[p])
            elif isinstance(v, dict) and v:
                walk(v, p + ".")
            else:
                ck.ok(f"README values table lists {p}", False)

    walk(values, "")

    def resolve(p: str) -> bool:
        d: Any = values
        for part in split_key(p):
            if not isinstance(d, dict) or part not in d:
                return False
            d = d[part]
        return True

    for p in table:
        ck.ok(f"README key {p} is in values.yaml", resolve(p))
    return keys


def split_key(p: str) -> list[str]:
    # Keys are dotted paths; map keys holding dots (kubernetes.io/arch) are not listed separately.
    return p.split(".")


# ---- mutation self-test -----------------------------------------------------------------------

def _ds_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind)


# (what is broken, a check whose name must then be among the failures, how)
MUTATIONS: list[tuple[str, str, Callable[[list[dict[str, Any]]], None]]] = [
    ("RuntimeClass handler", "RuntimeClass handler", lambda d: _kind(d, "RuntimeClass").update(handler="runc")),
    ("RuntimeClass name", "RuntimeClass name", lambda d: _kind(d, "RuntimeClass")["metadata"].update(name="kata")),
    ("RuntimeClass overhead memory", "RuntimeClass overhead", lambda d: _kind(d, "RuntimeClass")["overhead"]["podFixed"].update(memory="128Mi")),
    ("RuntimeClass scheduling label", "scheduling.nodeSelector is", lambda d: _kind(d, "RuntimeClass")["scheduling"].update(nodeSelector={"accordion": "true"})),
    ("command without --wait", "installer command", lambda d: _ds_container(d)["command"].remove("--wait")),
    ("command without --uninstall-on-exit", "installer command", lambda d: _ds_container(d)["command"].remove("--uninstall-on-exit")),
    ("command with another containerd version", "installer command", lambda d: _ds_container(d)["command"].__setitem__(11, "2")),
    ("command with an extra flag", "installer command", lambda d: _ds_container(d)["command"].append("--force")),
    ("NODE_NAME from another field", "installer env", lambda d: _ds_container(d)["env"][0]["valueFrom"]["fieldRef"].update(fieldPath="metadata.name")),
    ("not privileged", "installer securityContext", lambda d: _ds_container(d)["securityContext"].update(privileged=False)),
    ("readiness probe", "installer readinessProbe", lambda d: _ds_container(d)["readinessProbe"]["exec"]["command"].pop()),
    ("config mount writable", "config mount", lambda d: _ds_container(d)["volumeMounts"][1].update(readOnly=False)),
    ("hostPath not /", "host volume", lambda d: _kind(d, "DaemonSet")["spec"]["template"]["spec"]["volumes"][0]["hostPath"].update(path="/var")),
    ("grace period", "terminationGracePeriodSeconds", lambda d: _kind(d, "DaemonSet")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30)),
    ("hostPID", "pod hostPID", lambda d: _kind(d, "DaemonSet")["spec"]["template"]["spec"].update(hostPID=True)),
    ("unknown field (strict schema)", "strict: DaemonSet/accordion", lambda d: _ds_container(d).update(privilegedMode=True)),
    ("wrong type (schema)", "strict: DaemonSet/accordion", lambda d: _ds_container(d)["readinessProbe"].update(periodSeconds="10")),
    ("unknown RuntimeClass field (strict schema)", "strict: RuntimeClass/accordion", lambda d: _kind(d, "RuntimeClass").update(runtimeHandler="x")),
    ("config.toml not TOML", "config.toml parses as TOML", lambda d: _kind(d, "ConfigMap")["data"].update({"config.toml": "[vcpus\n"})),
    ("config.toml value", "config.toml values", lambda d: _kind(d, "ConfigMap")["data"].update(
        {"config.toml": _kind(d, "ConfigMap")["data"]["config.toml"].replace("max = 8", "max = 9")})),
    ("config.toml undocumented key", "documented in docs/configuration.md", lambda d: _kind(d, "ConfigMap")["data"].update(
        {"config.toml": "vcpu_max = 8\n" + _kind(d, "ConfigMap")["data"]["config.toml"]})),
    ("ClusterRole extra verb", "ClusterRole rules", lambda d: _kind(d, "ClusterRole")["rules"][0]["verbs"].append("list")),
    ("ClusterRole extra rule", "ClusterRole rules", lambda d: _kind(d, "ClusterRole")["rules"].append(
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]})),
    ("ClusterRoleBinding subject", "ClusterRoleBinding subjects", lambda d: _kind(d, "ClusterRoleBinding")["subjects"][0].update(name="default")),
    ("label missing", "ConfigMap/accordion-config: standard labels", lambda d: _kind(d, "ConfigMap")["metadata"]["labels"].pop("app.kubernetes.io/instance")),
    ("selector does not match", "selector matches", lambda d: _kind(d, "DaemonSet")["spec"]["selector"]["matchLabels"].update(x="y")),
    ("image", "installer image", lambda d: _ds_container(d).update(image="localhost/accordion-installer:latest")),
    ("object missing", "objects rendered", lambda d: d.remove(_kind(d, "ServiceAccount"))),
]


def self_test(docs: list[dict[str, Any]], notes: str) -> tuple[int, list[str]]:
    """Each mutation of the default render must make the check it targets fail."""
    missed = []
    case = CASES[0]
    for name, check, mutate in MUTATIONS:
        mutated = copy.deepcopy(docs)
        mutate(mutated)
        ck = Checks()
        check_render(ck, case, mutated, notes)
        check_schemas(ck, mutated)
        if not any(check in f for f in ck.failures):
            missed.append(f"{name} (failures: {'; '.join(ck.failures) or 'none'})")
    # NOTES, bad-values and lint checks can fail too.
    ck = Checks()
    check_render(ck, case, docs, notes.replace("--subresource resize", "--subresource status"))
    if not any("NOTES has '--subresource resize'" in f for f in ck.failures):
        missed.append("NOTES without --subresource resize")
    ck = Checks()
    check_bad(ck, "vcpus.max 600 (wrong message expected)", BAD[0][1], "some other message")
    if not ck.failures:
        missed.append("bad values with another message")
    ck = Checks()
    check_bad(ck, "good values", {}, BAD[0][2])
    if not ck.failures:
        missed.append("good values as bad values")
    # helm lint logs `fail` instead of failing (Helm's lint mode); break a copy of the chart instead.
    with tempfile.TemporaryDirectory() as tmp:
        broken = os.path.join(tmp, "accordion")
        shutil.copytree(CHART, broken)
        with open(os.path.join(broken, "templates", "rbac.yaml"), "a", encoding="utf-8") as f:
            f.write("  - apiGroups: [\"\"\n")
        problems = helm_template.lint(broken, {}, "v1.33.0")
    if not problems:
        missed.append("helm lint of a chart rendering invalid YAML")
    return len(MUTATIONS) + 4, missed


def main() -> int:
    t0 = time.monotonic()
    failed = 0
    print(f"chart-test: {helm_template.versions()}; kubernetes-validate {kubernetes_validate.__version__}, "
          f"schemas {' '.join(K8S_VERSIONS)} strict")
    default_render: tuple[list[dict[str, Any]], str] | None = None
    for case in CASES:
        t = time.monotonic()
        ck = Checks()
        values = helm_template.load_values([os.path.join(HERE, f) for f in case.files])
        try:
            manifest, notes = helm_template.render(CHART, values, name=case.release, namespace=case.namespace)
        except helm_template.RenderError as err:
            print(f"chart-test: {case.name}: FAILED: rendering failed: {err}")
            failed += 1
            continue
        if OUT:
            os.makedirs(OUT, exist_ok=True)
            with open(os.path.join(OUT, f"{case.name}.yaml"), "w", encoding="utf-8") as f:
                f.write(manifest + "\n# NOTES.txt:\n" + "".join(f"# {ln}\n" for ln in notes.splitlines()))
        docs = parse_manifest(manifest)
        check_schemas(ck, docs)
        check_lint(ck, values)
        check_render(ck, case, docs, notes)
        if case.name == "default":
            default_render = (docs, notes)
        status = "ok" if not ck.failures else f"FAILED ({len(ck.failures)} of {ck.count} checks)"
        files = " ".join(f"-f tests/chart/{f}" for f in case.files) or "default values"
        print(f"chart-test: {case.name} ({files}): {status}: {len(docs)} objects "
              f"({', '.join(sorted(d['kind'] for d in docs))}), {ck.count} checks "
              f"[schemas, lint, content], {time.monotonic() - t:.1f}s")
        for fl in ck.failures:
            print(f"    FAIL {fl}")
        failed += bool(ck.failures)

    ck = Checks()
    for name, values, message in BAD:
        check_bad(ck, name, values, message)
    status = "ok" if not ck.failures else f"FAILED ({len(ck.failures)} of {ck.count})"
    print(f"chart-test: bad values: {status}: {len(BAD)} refused with the chart's fail message "
          f"({', '.join(n for n, _, _ in BAD)})")
    for fl in ck.failures:
        print(f"    FAIL {fl}")
    failed += bool(ck.failures)

    ck = Checks()
    keys = check_values_docs(ck)
    status = "ok" if not ck.failures else f"FAILED ({len(ck.failures)} of {ck.count})"
    print(f"chart-test: values.yaml/README: {status}: {keys} keys each with a comment above, "
          f"README table matches values.yaml ({ck.count} checks)")
    for fl in ck.failures:
        print(f"    FAIL {fl}")
    failed += bool(ck.failures)

    if default_render:
        n, missed = self_test(*default_render)
        status = "ok" if not missed else f"FAILED: not caught: {', '.join(missed)}"
        print(f"chart-test: self-test: {status}: {n - len(missed)} of {n} deliberate breakages caught")
        failed += bool(missed)

    total = len(CASES) + 3
    print(f"chart-test: {total} groups in {time.monotonic() - t0:.1f}s")
    print(f"chart-test: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
