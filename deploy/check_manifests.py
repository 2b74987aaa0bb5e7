"""Check rendered Helm manifests offline: Kubernetes schemas, CRD models, and the chart's own promises.

Used by deploy/validate.sh (it runs in the validation tools' virtual environment, not the project's):

    python deploy/check_manifests.py RENDERED.yaml --k8s 1.25.0 --k8s 1.37.0 [--gpu] [--expect KIND ...]

- Built-in kinds are validated strictly (unknown fields are errors) against the OpenAPI-derived JSON schemas that the
  ``kubernetes-validate`` package ships, for each ``--k8s`` version.
- KEDA (ScaledObject, TriggerAuthentication) and Prometheus Operator (ServiceMonitor, PrometheusRule) objects are
  validated against the ``cloudcoil-models-keda`` / ``cloudcoil-models-prometheus-operator`` models, which are
  generated from those projects' CRD schemas; unknown fields are made errors here too.
- The chart's promises: probes on /readyz and /healthz, no literal secret in any env value, service links off,
  GPU limits when asked, KEDA maxReplicaCount <= the partition count and no fixed replica count beside KEDA; the
  ServiceMonitor's job label is the chart's name and the PrometheusRule carries files/alerts.yml's groups unchanged
  (the alert rules select job="spectranet").

Prints one line per object (with the reasons under a failure) and exits 1 if any object failed.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import typing
from pathlib import Path

import kubernetes_validate
import pydantic
import yaml

CORE_SKIP = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
ALERTS = Path(__file__).parent / "helm/spectranet/files/alerts.yml"
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)URL$", re.IGNORECASE)


def _strict_models() -> dict[str, type[pydantic.BaseModel]]:
    """The CRD models, with extra fields forbidden in every nested model they reach."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    roots = {"ScaledObject": ScaledObject, "TriggerAuthentication": TriggerAuthentication,
             "ServiceMonitor": ServiceMonitor, "PrometheusRule": PrometheusRule}
    seen: list[type[pydantic.BaseModel]] = []

    def walk(tp: object) -> None:
        if inspect.isclass(tp) and issubclass(tp, pydantic.BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for field in tp.model_fields.values():
                walk(field.annotation)
        for arg in typing.get_args(tp):
            walk(arg)

    for model in roots.values():
        walk(model)
    for model in seen:
        model.model_config["extra"] = "forbid"
    for model in reversed(seen):  # leaves first, so parents embed the rebuilt (strict) children
        model.model_rebuild(force=True)
    for model in roots.values():
        model.model_rebuild(force=True)
    return roots


def _promises(doc: dict, args: argparse.Namespace) -> list[str]:
    problems = []
    kind = doc["kind"]
    if kind in {"Deployment", "Job"}:
        pod = doc["spec"]["template"]["spec"]
        if pod.get("enableServiceLinks") is not False:
            problems.append("enableServiceLinks must be false (KAFKA_* service links would become client properties)")
        for c in pod["containers"]:
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]) and "value" in env:
                    problems.append(f"env {env['name']} is a literal; secrets must come from a Secret")
        if kind == "Deployment":
            c = pod["containers"][0]
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                problems.append("readiness probe must be GET /readyz")
            if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
                problems.append("liveness probe must be GET /healthz")
            gpu = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if args.gpu and not gpu:
                problems.append("gpu.enabled but no nvidia.com/gpu limit")
            if not args.gpu and gpu:
                problems.append("nvidia.com/gpu limit without gpu.enabled")
            if "ScaledObject" in args.expect and "replicas" in doc["spec"]:
                problems.append("a fixed replica count beside KEDA would fight the autoscaler")
    if kind == "ScaledObject":
        if args.partitions is None or doc["spec"]["maxReplicaCount"] > args.partitions:
            problems.append(f"maxReplicaCount {doc['spec']['maxReplicaCount']} exceeds the "
                            f"{args.partitions} partitions")
        for t in doc["spec"]["triggers"]:
            if t["type"] != "kafka" or t["metadata"].get("allowIdleConsumers") != "false":
                problems.append("triggers must be kafka with allowIdleConsumers 'false'")
    if kind == "ServiceMonitor" and doc["spec"].get("jobLabel") != "app.kubernetes.io/name":
        problems.append('jobLabel must be app.kubernetes.io/name (job="spectranet", which the alert rules select)')
    if kind == "PrometheusRule" and doc["spec"]["groups"] != yaml.safe_load(ALERTS.read_text())["groups"]:
        problems.append(f"spec.groups differ from {ALERTS}'s groups (the rules' one copy)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifests", type=Path)
    ap.add_argument("--k8s", action="append", required=True, help="Kubernetes version to validate against")
    ap.add_argument("--gpu", action="store_true", help="the values enable the GPU")
    ap.add_argument("--expect", action="append", default=[], help="a kind that must be rendered")
    ap.add_argument("--partitions", type=int, help="kafka.partitions of the rendered values")
    args = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(args.manifests.read_text()) if d]
    models = _strict_models()
    kinds = {d["kind"] for d in docs}
    failures = 0
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        errors = []
        if doc["kind"] in CORE_SKIP:
            try:
                models[doc["kind"]].model_validate(doc)
            except pydantic.ValidationError as exc:
                errors.append(f"CRD model: {exc}")
        else:
            for version in args.k8s:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                    errors.append(f"k8s {version}: {exc}")
        errors += _promises(doc, args)
        failures += bool(errors)
        print(f"  {'ok  ' if not errors else 'FAIL'} {name}")
        for e in errors:
            print("       " + e.replace("\n", "\n       "))
    for wanted in args.expect:
        if wanted not in kinds:
            print(f"  FAIL no {wanted} rendered")
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
