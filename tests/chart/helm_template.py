#!/usr/bin/env python3
"""`helm template` through Helm's own Go SDK (helm-python-sdk's libhelm_c, Helm v4.2.3).

    helm_template.py [-f VALUES.yaml]... [--name RELEASE] [--namespace NS] [--notes] CHART_DIR

prints what `helm template RELEASE CHART_DIR -f ... --namespace NS` prints: the manifests, sorted in
Helm's install order, each document headed by `# Source:`; with --notes, NOTES.txt rendered too.

It is Helm's client-only install (`helm install --dry-run=client`, which is what `helm template`
runs): values files are parsed by Helm's values parser, merged in order with Helm's rule for
-f (later files win, maps merge key by key), then coalesced with the chart's values.yaml by Helm
itself. No cluster is contacted: KUBECONFIG points at a file that does not exist and releases are
kept in memory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

# Never read the user's kubeconfig: a client-only render needs none.
os.environ["KUBECONFIG"] = os.path.join(tempfile.gettempdir(), "accordion-chart-test-no-kubeconfig")

import helm_python as helm  # noqa: E402


class RenderError(Exception):
    """Helm refused to render (a template `fail`, a parse error, bad values)."""


def merge_maps(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Helm's mergeMaps for -f files (pkg/cli/values): b wins; maps are merged recursively."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_maps(out[k], v)
        else:
            out[k] = v
    return out


def load_values(files: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for f in files:
        with open(f, encoding="utf-8") as fh:
            values = merge_maps(values, helm.values_from_yaml(fh.read()) or {})
    return values


def render(
    chart_dir: str,
    values: dict[str, Any] | None = None,
    *,
    name: str = "accordion",
    namespace: str = "default",
) -> tuple[str, str]:
    """Renders the chart as `helm template`; returns (manifest, notes)."""
    with helm.Config(storage_driver="memory", namespace=namespace) as cfg:
        try:
            release = cfg.install(chart_dir, name, values or {}, namespace=namespace, dry_run="client")
        except helm.HelmError as e:
            raise RenderError(str(e)) from e
    return release["manifest"], release.get("notes") or ""


def lint(chart_dir: str, values: dict[str, Any] | None, kube_version: str) -> list[str]:
    """`helm lint --strict --kube-version`: the findings that make it fail (warnings and errors)."""
    report = helm.lint(chart_dir, values or {}, strict=True, kube_version=kube_version)
    problems = [f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    return problems + list(report.get("errors") or [])


def versions() -> str:
    return f"helm-python-sdk {helm.helm_c_version()}, Helm SDK {helm.helm_sdk_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chart")
    p.add_argument("-f", "--values", action="append", default=[], help="values file (repeatable)")
    p.add_argument("--name", default="accordion", help="release name (default accordion)")
    p.add_argument("--namespace", default="default", help="release namespace (default default)")
    p.add_argument("--notes", action="store_true", help="print the rendered NOTES.txt after the manifests")
    p.add_argument("--version", action="store_true", help="print the Helm SDK version and exit")
    args = p.parse_args()
    if args.version:
        print(versions())
        return 0
    try:
        manifest, notes = render(args.chart, load_values(args.values), name=args.name, namespace=args.namespace)
    except RenderError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(manifest)
    if args.notes:
        sys.stdout.write("\nNOTES:\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
