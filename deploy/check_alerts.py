"""Check the alert rules file and how it is shipped, offline.

Used by deploy/validate.sh (in the validation tools' virtual environment; reads the daemon's source, imports none):

    python deploy/check_alerts.py [--prometheus-image prom/prometheus:vX.Y.Z]

- deploy/helm/spectranet/files/alerts.yml parses as a rule file (groups -> rules); each rule is an alert with an
  expr, a ``for``, ``labels.severity`` and ``annotations.summary`` / ``.description``; the four alerts are there.
- Every metric an ``expr`` names is one the daemon exports: the ``spectranet_*`` instruments of
  streamer/runtime/metrics.py under their exported names (a Counter as ``<name>_total``, a Histogram as
  ``_bucket`` / ``_sum`` / ``_count``), or Prometheus' own ``up``.
- deploy/compose.yaml mounts that file read-only into the prometheus service, at the path deploy/prometheus.yml lists
  under rule_files (and, with --prometheus-image, runs the Prometheus that promtool was built for).

promtool itself (validate.sh) checks the PromQL and runs the unit tests; this checks what promtool cannot know.
Prints what it checked and exits 1 on any problem.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ALERTS = Path("deploy/helm/spectranet/files/alerts.yml")
METRICS_SOURCE = Path("streamer/runtime/metrics.py")
COMPOSE = Path("deploy/compose.yaml")
PROMETHEUS_CONFIG = Path("deploy/prometheus.yml")
MOUNTED_AT = "/etc/prometheus/alerts.yml"
EXPECTED_ALERTS = {"SpectraNetStalled", "SpectraNetDown", "SpectraNetAbsent", "SpectraNetConsumerLagHigh",
                   "SpectraNetDeadLettersHigh"}
PROMETHEUS_OWN = {"up"}

# prometheus_client's exported series per instrument type (the _created series are left out: nothing alerts on them).
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count"),
            "Summary": ("_sum", "_count", ""), "Info": ("_info",), "Enum": ("",)}
# PromQL words that look like identifiers but are not metric names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "start", "end"}


def exported_metrics(source: Path) -> dict[str, str]:
    """{exported series name: instrument} for each prometheus_client instrument built in ``source``."""
    names: dict[str, str] = {}
    for node in ast.walk(ast.parse(source.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES):
            continue
        if not (node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            continue
        base = node.args[0].value
        if node.func.id == "Counter":
            base = base.removesuffix("_total")  # prometheus_client strips it, then appends _total
        for suffix in SUFFIXES[node.func.id]:
            names[base + suffix] = f"{node.func.id}({node.args[0].value!r})"
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, label lists, ranges and strings removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", e)
    idents = re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e)  # not a function or aggregation call
    return {m.group(1) for m in idents} - KEYWORDS - {"by", "without"}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alerts", type=Path, default=ALERTS)
    ap.add_argument("--prometheus-image", help="the image compose's prometheus service must run")
    args = ap.parse_args()

    problems: list[str] = []
    known = exported_metrics(METRICS_SOURCE)
    if not any(n.startswith("spectranet_") for n in known):
        problems.append(f"no spectranet_* instruments found in {METRICS_SOURCE}")
    known_all = set(known) | PROMETHEUS_OWN

    doc = yaml.safe_load(args.alerts.read_text())
    if not isinstance(doc, dict) or set(doc) != {"groups"} or not isinstance(doc["groups"], list):
        print(f"FAIL {args.alerts}: not a rule file (a mapping with only `groups:`, a list)")
        return 1
    seen = []
    for group in doc["groups"]:
        for rule in group.get("rules") or []:
            name = rule.get("alert")
            if not name:
                problems.append(f"group {group.get('name')}: a rule without `alert:` ({rule.get('record')!r})")
                continue
            seen.append(name)
            if not rule.get("for"):
                problems.append(f"{name}: no `for:`")
            if not (rule.get("labels") or {}).get("severity"):
                problems.append(f"{name}: no labels.severity")
            for key in ("summary", "description"):
                if not (rule.get("annotations") or {}).get(key):
                    problems.append(f"{name}: no annotations.{key}")
            used = metric_names(str(rule.get("expr", "")))
            if not used:
                problems.append(f"{name}: expr {rule.get('expr')!r} names no metric")
            for metric in sorted(used - known_all):
                hint = ""
                if metric + "_total" in known:
                    hint = f" (a counter: the daemon exports {metric}_total)"
                problems.append(f"{name}: expr names {metric!r}, which the daemon does not export{hint}")
            print(f"  {name}: {', '.join(sorted(used))}")
    if sorted(seen) != sorted(set(seen)):
        problems.append(f"duplicate alert names: {seen}")
    if missing := EXPECTED_ALERTS - set(seen):
        problems.append(f"missing alerts: {sorted(missing)}")

    compose = yaml.safe_load(COMPOSE.read_text())
    prometheus = compose["services"]["prometheus"]
    mount = f"./{args.alerts.relative_to(COMPOSE.parent).as_posix()}:{MOUNTED_AT}:ro"
    if mount not in prometheus.get("volumes", []):
        problems.append(f"{COMPOSE}: the prometheus service does not mount {mount}")
    if args.prometheus_image and prometheus.get("image") != args.prometheus_image:
        problems.append(f"{COMPOSE}: prometheus runs {prometheus.get('image')}, promtool is {args.prometheus_image}'s")
    rule_files = yaml.safe_load(PROMETHEUS_CONFIG.read_text()).get("rule_files") or []
    if MOUNTED_AT not in rule_files:
        problems.append(f"{PROMETHEUS_CONFIG}: rule_files {rule_files} does not list {MOUNTED_AT}")
    print(f"  compose mounts {mount}; {PROMETHEUS_CONFIG} rule_files: {rule_files}")

    for p in problems:
        print(f"FAIL {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
