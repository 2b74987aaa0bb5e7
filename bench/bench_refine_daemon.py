"""The daemon end to end with template refinement on (the default) and off, through real Apache Kafka and PostgreSQL.

    python bench/bench_refine_daemon.py [--packets 2000] [--repeats 2] [--write]

The daemon runs as deployed (``python -m spectranet.streamer.cli run``, default configuration: torch's own thread count,
one per core, as ``model.threads`` leaves it) on N real packets published before it starts; sustained throughput is
N / (last arrival on the output topic - first ``consumed_at``), start-up and model load excluded, as in bench_e2e.py.
The daemon's CPU time over the same span (``/proc/<pid>/stat``) is the figure the other load on a shared machine
disturbs least. Variants, run in turn so that a change of load hits each alike:

- ``on``: ``model.templates`` = "" (the shipped bank), OpenBLAS pinned to one thread by the CLI (its default);
- ``off``: ``model.templates`` = "none";
- ``on, 1 torch thread``: as ``on`` with ``model.threads`` = 1 (and ``OMP_NUM_THREADS=1``), as when one daemon per core
  shares a host (README: set 1 then); sessions 7-10 reported this row as the headline;
- ``on, 2 BLAS threads``: as ``on`` with ``OPENBLAS_NUM_THREADS=2``, to check the CLI's default;
- ``on, bf16``: as ``on`` with ``model.precision`` = bfloat16 (the CPU default is float32).

Writes bench/results/refine_daemon.json; ``--write`` also puts its section into BENCHMARKS.md (``section``, which
``run_all.py`` renders too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bench_e2e import Blocks, DaemonProcess, OutputWatcher, Publisher, create_topics, daemon_env
from common import ROOT, base_packets, load, machine

RESULTS = ROOT / "bench" / "results"
OUT = RESULTS / "refine_daemon.json"
TITLE = "## Daemon end to end with template refinement (bench/bench_refine_daemon.py)"
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SPECTRANET_MODEL__THREADS": "1"}
VARIANTS: dict[str, dict[str, str]] = {
    "on": {"SPECTRANET_MODEL__TEMPLATES": ""},
    "off": {"SPECTRANET_MODEL__TEMPLATES": "none"},
    "on, 1 torch thread": {"SPECTRANET_MODEL__TEMPLATES": "", **_ONE_THREAD},
    "on, 2 BLAS threads": {"SPECTRANET_MODEL__TEMPLATES": "", "OPENBLAS_NUM_THREADS": "2"},
    "on, bf16": {"SPECTRANET_MODEL__TEMPLATES": "", "SPECTRANET_MODEL__PRECISION": "bfloat16"},
}
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of stat)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def one_run(variant: str, *, bootstrap: str, pg_dsn: str, create_database: Any, base: list[dict[str, Any]],
            n: int) -> dict[str, Any]:
    import sqlalchemy as sa
    from spectranet.streamer.runtime import db

    name = f"refine_{uuid.uuid4().hex[:8]}"
    topic, output = f"{name}-in", f"{name}-out"
    url = create_database(pg_dsn, name)
    db.upgrade(url)
    create_topics(bootstrap, inputs=topic, partitions=3, output=output)
    items, revs = Blocks(base).take(n)
    Publisher(bootstrap, topic).burst(items)
    watcher = OutputWatcher(bootstrap, output)
    env = {**daemon_env(bootstrap=bootstrap, group=name, topic=topic, output=output, database_url=url, threads=None),
           **VARIANTS[variant]}
    proc = DaemonProcess(env, RESULTS / "daemon-refine.log")
    load_start, cpu_first = load(), None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            got = len(watcher.block(revs))
            if got and cpu_first is None:
                cpu_first = _cpu_s(proc.pid)  # the first batch is out: start-up and model load are behind
            if got >= n:
                break
            time.sleep(0.05)
        cpu_last = _cpu_s(proc.pid)
        recs = watcher.block(revs)
        uptime = _uptime()
    finally:
        rc = proc.stop()
        watcher.close()
    first = min(r["consumed_at"] for r in recs)
    last = max(r["arrived"] for r in recs)
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT z_method, count(*) FROM classifications GROUP BY z_method")).all()
        methods: dict[str, int] = {str(m): int(c) for m, c in rows}
    engine.dispose()
    first_batch = min(len(recs), 64)
    row = {"variant": variant, "n": len(recs), "seconds": round(last - first, 2),
           "spectra_per_s": round(len(recs) / (last - first), 1),
           "cpu_ms_per_spectrum": round(1000 * (cpu_last - (cpu_first or 0.0)) / max(len(recs) - first_batch, 1), 2),
           "z_methods": methods, "daemon_exit_code": rc, "load_average_start": load_start, "load_average_end": load(),
           "uptime": uptime}
    print(json.dumps(row), flush=True)
    return row


def _verdict(rates: list[float], target: float = 200.0) -> str:
    """Whether the sorted ``rates`` meet ``target``: by every run, by some, or not."""
    return "met by every run" if rates[0] >= target else "met by some runs" if rates[-1] >= target else "not met"


def section(r: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for the results ``r`` (bench/results/refine_daemon.json)."""
    m = r["machine"]
    rows = []
    for variant in VARIANTS:
        runs = [x for x in r["runs"] if x["variant"] == variant]
        if not runs:
            continue
        rates = ", ".join(f"{x['spectra_per_s']:,.1f}" for x in runs)
        cpu = ", ".join(f"{x['cpu_ms_per_spectrum']:.2f}" for x in runs)
        methods = runs[-1]["z_methods"]
        refined = methods.get("template", 0) / max(sum(methods.values()), 1)
        la = "; ".join(" / ".join(f"{v:.2f}" for v in x["load_average_end"]) for x in runs)
        rows.append(f"| {variant} | {rates} | {cpu} | {100 * refined:.0f} % | {la} |")
    on = sorted(x["spectra_per_s"] for x in r["runs"] if x["variant"] == "on")
    bf16 = sorted(x["spectra_per_s"] for x in r["runs"] if x["variant"] == "on, bf16")
    return "\n".join([
        TITLE, "",
        f"{r['date']}, commit `{m['commit']}`; {m['cpu']}, `nproc` = {m['nproc']}, RAM {m['ram_gb']} GB; Python "
        f"{m['python']}, torch {m['torch']}, numpy {m['numpy']}; {r['kafka']}, {r['postgres']}. {r['packets']:,} real "
        "packets (the 200 test spectra, each several revisions) published to 3 partitions before the daemon starts; "
        "one daemon subprocess, default configuration (batches of 64 or 0.25 s, pipelined, torch's default threads: "
        "one per core) unless the variant says otherwise. "
        f"`uptime` at the start: `{r['uptime_start']}`; at the end: `{r['uptime_end']}`.", "",
        f"**{r['shared_cpu_note']}**", "",
        "| model.templates | spectra/s (each run) | daemon CPU ms / spectrum | redshifts refined | load average "
        "(1 / 5 / 15 min) at the end of each run |",
        "|---|---:|---:|---:|---|",
        *rows, "",
        f"Target (issue 14): >= 200 spectra/s end to end with the refinement on: {on[0]:,.1f} to {on[-1]:,.1f} "
        f"spectra/s in the default configuration ({_verdict(on)} on this machine)"
        + (f"; {bf16[0]:,.1f} to {bf16[-1]:,.1f} with `model.precision: bfloat16` ({_verdict(bf16)})" if bf16 else "")
        + ". Spectra/s is N / (last arrival - first "
        "consumed_at); CPU time is the daemon's (all threads) from its first output to its last, per spectrum after "
        "the first batch. The CLI pins OpenBLAS to one thread (`OPENBLAS_NUM_THREADS`, unless set)"
        + (": the last row shows what a second one costs." if any(x["variant"] == "on, 2 BLAS threads"
                                                                  for x in r["runs"]) else "."), "",
    ])


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace this benchmark's section of ``path`` (up to the next '## '), or append it."""
    doc = path.read_text()
    start = doc.find(TITLE)
    if start < 0:
        doc = doc.rstrip("\n") + "\n\n" + text
    else:
        end = doc.find("\n## ", start + len(TITLE))
        doc = doc[:start] + text + ("" if end < 0 else doc[end + 1:])
    path.write_text(doc.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--note", default="A long training job (2 processes) shared the 2 CPUs during this run: the "
                                      "figures are a lower bound for a dedicated machine.")
    ap.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    ap.add_argument("--render-only", action="store_true", help="only render bench/results/refine_daemon.json")
    args = ap.parse_args()
    if args.render_only:
        text = section(json.loads(OUT.read_text()))
        print(text)
        if args.write:
            write_section(text)
        return

    from tests.support.kafka import start_kafka
    from tests.support.postgres import create_database, start_postgres

    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine(1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "packets": args.packets, "uptime_start": _uptime(), "shared_cpu_note": args.note,
                              "runs": []}
    base = base_packets()
    kafka, pg = start_kafka(), start_postgres()
    try:
        result["kafka"], result["postgres"] = kafka.backend, pg.backend
        for _ in range(args.repeats):
            for variant in args.variants:
                result["runs"].append(one_run(variant, bootstrap=kafka.bootstrap_servers, pg_dsn=pg.dsn,
                                              create_database=create_database, base=base, n=args.packets))
    finally:
        kafka.stop()
        pg.stop()
    result["uptime_end"] = _uptime()
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    text = section(result)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
