"""The ``spectranet`` command: run the daemon, publish spectra, classify files, manage the database, run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("spectranet")


def _cmd_run(args: argparse.Namespace) -> int:
    from spectranet.streamer.app import build_daemon, close_daemon
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.runtime.logs import configure_logging

    settings = load_settings(args.config)
    configure_logging(settings.log_level, settings.log_format)
    log.info("starting with %r", settings)  # secrets print as '**********'
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        """Finish the batch in hand, commit, close; past the deadline exit anyway (the batch is redelivered)."""
        if stop.is_set():
            return
        log.info("signal %d: finishing the current batch (deadline %.0f s)", signum, settings.shutdown_timeout_s)
        stop.set()
        timer = threading.Timer(settings.shutdown_timeout_s, lambda: os._exit(3))
        timer.daemon = True
        timer.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    daemon = build_daemon(settings)  # closes what it built if it fails part-way
    try:
        stats = daemon.run(stop, max_messages=args.max_messages, idle_timeout_s=args.idle_timeout)
    except BaseException:
        close_daemon(daemon)  # run() failed before its own finally (e.g. the model registration)
        raise
    print(f"processed {stats.messages} packets in {stats.batches} batches: {stats.classified} classified, "
          f"{stats.dead_lettered} dead-lettered")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    """Reprocess the input topics from a point in time, in a separate consumer group (production is untouched)."""
    from datetime import datetime, timezone

    from spectranet.streamer.app import build_daemon, close_daemon
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.runtime.logs import configure_logging

    since = datetime.fromisoformat(args.since)
    since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
    base = load_settings(args.config)
    group = args.group or f"{base.kafka.group_id}-replay-{int(since.timestamp())}"
    settings = load_settings(args.config, kafka={**base.kafka.model_dump(), "group_id": group,
                                                 "group_instance_id": None})
    configure_logging(settings.log_level, settings.log_format)
    daemon = build_daemon(settings, serve_metrics=False, start_at_ms=int(since.timestamp() * 1000))
    try:
        stats = daemon.run(idle_timeout_s=args.idle_timeout)
    except BaseException:
        close_daemon(daemon)
        raise
    print(f"replayed {stats.messages} packets since {since.isoformat()} in group {group}: "
          f"{stats.classified} classified, {stats.dead_lettered} dead-lettered")
    return 0


def _cmd_reprocess(args: argparse.Namespace) -> int:
    from spectranet.streamer.app import build_inference
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.contract.codec import Codec
    from spectranet.streamer.runtime import db
    from spectranet.streamer.runtime.classifier import SpectrumClassifier
    from spectranet.streamer.tools.reprocess import reprocess

    settings = load_settings(args.config)
    inference = build_inference(settings.model.model_copy(update={"path": args.model}))  # model.templates as the daemon
    classifier = SpectrumClassifier(inference, codec=Codec("spectrum_packet"))
    ok, failed = reprocess(db.create_engine(settings.database.url.get_secret_value()), classifier)
    print(f"re-classified {ok} stored spectra with {inference.checkpoint.name} {inference.checkpoint.version}"
          f" ({failed} could not be classified or stored)")
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.runtime.kafka_io import KafkaWatch, librdkafka_log
    from spectranet.streamer.runtime.logs import setting_names
    from spectranet.streamer.tools.files import NOT_DELIVERED, publish_files

    kafka = load_settings(args.config).kafka  # security settings (TLS, SASL) as for the daemon
    bootstrap = args.bootstrap_servers or kafka.bootstrap_servers
    # librdkafka reports every error to error_cb too, which says it once with the setting to change; its raw log
    # would repeat that for a one-shot command.
    librdkafka_log.setLevel(logging.CRITICAL)
    watch = KafkaWatch(bootstrap_servers=bootstrap, setting="--bootstrap-servers" if args.bootstrap_servers
                       else setting_names("kafka.bootstrap_servers"))
    n_ok, errors = publish_files(args.files, topic=args.topic, bootstrap_servers=bootstrap, framing=args.framing,
                                 survey=args.survey, timeout_s=args.timeout, watch=watch,
                                 extra_config={k: v for k, v in kafka.client_config().items()
                                               if k != "bootstrap.servers"})
    undelivered = [err for path, err in errors if path == NOT_DELIVERED]
    for path, err in errors:
        if path != NOT_DELIVERED:
            print(f"skipped {path}: {err}", file=sys.stderr)
    for err in undelivered:
        print(f"error: {err}", file=sys.stderr)
    print(f"published {n_ok} packets to {args.topic}")
    return 1 if undelivered or (errors and not n_ok) else 0


def _cmd_check(args: argparse.Namespace) -> int:
    from spectranet.streamer.tools.check import run_checks

    logging.getLogger("alembic").setLevel(logging.WARNING)  # reading the revision announces the migration context
    failed = 0
    for result in run_checks(config_file=args.config, timeout_s=args.timeout):
        print(result.line(), flush=True)
        failed += not result.ok
    return 1 if failed else 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from spectranet.streamer.errors import CheckpointError, ConfigError
    from spectranet.streamer.science.checkpoint import load_checkpoint
    from spectranet.streamer.science.inference import InferenceEngine, resolve_template_bank
    from spectranet.streamer.tools.files import classify_files, describe_result

    checkpoint = load_checkpoint(args.model)
    try:
        templates = resolve_template_bank(args.templates, checkpoint)
    except (CheckpointError, ConfigError) as exc:
        raise ConfigError(f"--templates {args.templates!r}: {exc}") from exc
    inference = InferenceEngine(checkpoint, device=args.device, templates=templates, threads=args.threads or None,
                                precision=args.precision)
    failed = 0
    for result in classify_files(args.files, inference):
        failed += "error" in result
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            print(f"{result['file']}: {describe_result(result)}")
    return 1 if failed == len(args.files) else 0


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from spectranet.streamer.app import open_database
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.runtime import db

    settings = load_settings(args.config)
    open_database(settings.database).dispose()  # unreachable, refused: one line naming the setting, no traceback
    db.upgrade(settings.database.url.get_secret_value(), args.revision)
    print(f"database upgraded to {args.revision}")
    return 0


def _cmd_db_grant(args: argparse.Namespace) -> int:
    from spectranet.streamer.app import open_database
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.runtime import db

    if args.print:
        print(";\n".join(db.least_privilege_grants(args.role)) + ";")
        return 0
    settings = load_settings(args.config)
    db.grant_least_privilege(open_database(settings.database), args.role)
    print(f"granted the daemon's privileges to {args.role}")
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from spectranet.streamer.app import open_database
    from spectranet.streamer.config import load_settings
    from spectranet.streamer.tools.dlq import list_dead_letters, replay_dead_letters

    settings = load_settings(args.config)
    db_engine = open_database(settings.database)
    if args.dlq_command == "list":
        rows = list_dead_letters(db_engine, limit=args.limit, error_class=args.error_class)
        for r in rows:
            where = f"{r['source_topic']}[{r['source_partition']}]@{r['source_offset']}"
            print(f"{r['failed_at']:%Y-%m-%d %H:%M:%S} {where} "
                  f"{r['error_class']}({r['error_field'] or '-'}): {r['error_message']}")
        print(f"{len(rows)} dead letters shown")
    else:
        n = replay_dead_letters(db_engine, settings.kafka, topic=args.topic, error_class=args.error_class)
        print(f"replayed {n} dead letters")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spectranet.streamer.tools.demo import run_demo

    return run_demo(output_dir=args.output)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spectranet", description="SpectraNet Stream: classify transient spectra.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon (Kafka in, database + Kafka out)")
    p.add_argument("--config", type=Path, help="TOML or YAML config file (env SPECTRANET_* overrides it)")
    p.add_argument("--max-messages", type=int, help="stop after this many packets (testing)")
    p.add_argument("--idle-timeout", type=float, help="stop after this many seconds without packets")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("replay", help="reprocess the input topics from a time, in a separate consumer group")
    p.add_argument("--since", required=True, help="ISO time, e.g. 2026-11-24T00:00 (UTC unless an offset is given)")
    p.add_argument("--group", help="consumer group (default: '<group>-replay-<since>')")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="stop after this long without packets")
    p.add_argument("--config", type=Path)
    p.set_defaults(func=_cmd_replay)

    p = sub.add_parser("reprocess", help="re-classify stored spectra with another model (keeps earlier rows)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--config", type=Path)
    p.set_defaults(func=_cmd_reprocess)

    p = sub.add_parser("produce", help="publish spectrum files as spectrum packets")
    p.add_argument("files", nargs="+")
    p.add_argument("--topic", required=True)
    p.add_argument("--bootstrap-servers", help="default: kafka.bootstrap_servers from the configuration")
    p.add_argument("--config", type=Path, help="TOML or YAML config file (for the Kafka security settings)")
    p.add_argument("--framing", choices=["schemaless", "confluent", "container"], default="schemaless")
    p.add_argument("--survey", default="TNS")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="give up on packets not delivered this many seconds after the last one is sent (default 30)")
    p.set_defaults(func=_cmd_produce)

    p = sub.add_parser("check", help="check the configuration, broker, topics, database and model; one line each")
    p.add_argument("--config", type=Path, help="TOML or YAML config file (env SPECTRANET_* overrides it)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker (default 10)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("classify", help="classify spectrum files (no Kafka, no database)")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", type=Path, help="checkpoint (default: the shipped model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    p.add_argument("--templates", default="", metavar="PATH|none",
                   help="template bank that refines the redshift (default: the shipped one; 'none': off)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the CPU batches are small, and on a busy machine more threads "
                        "spin, measured 14x slower on 2 shared cores; 0: one per core)")
    p.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="network arithmetic (default auto: bf16 on CUDA, float32 on CPU; bfloat16 halves the CPU time "
                        "on an AMX/AVX512-BF16 CPU and changes 0.5%% of the calls: 9 of 1,935 with 0.9.1)")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("db", help="database management")
    dbsub = p.add_subparsers(dest="db_command", required=True)
    q = dbsub.add_parser("upgrade", help="apply Alembic migrations")
    q.add_argument("--config", type=Path)
    q.add_argument("--revision", default="head")
    q.set_defaults(func=_cmd_db_upgrade)
    q = dbsub.add_parser("grant", help="grant a role exactly what the daemon needs (run as the owner)")
    q.add_argument("--role", required=True)
    q.add_argument("--print", action="store_true", help="print the GRANT statements instead of running them")
    q.add_argument("--config", type=Path)
    q.set_defaults(func=_cmd_db_grant)

    p = sub.add_parser("dlq", help="inspect and replay dead letters (from the database)")
    dsub = p.add_subparsers(dest="dlq_command", required=True)
    q = dsub.add_parser("list", help="the most recent dead letters and their reasons")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--error-class", help="e.g. DecodeError, ValidationError, UnitError")
    q.add_argument("--config", type=Path)
    q.set_defaults(func=_cmd_dlq)
    q = dsub.add_parser("replay", help="publish stored dead letters again (after fixing the cause)")
    q.add_argument("--topic", help="publish here instead of each packet's source topic")
    q.add_argument("--error-class")
    q.add_argument("--config", type=Path)
    q.set_defaults(func=_cmd_dlq)

    _add_plugin_subcommands(sub)

    p = sub.add_parser("demo", help="the whole pipeline on embedded defaults (tansu broker, SQLite, shipped model)")
    p.add_argument("--output", type=Path, default=Path("spectranet-demo"))
    p.set_defaults(func=_cmd_demo)
    return ap


def _add_plugin_subcommands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Subcommands registered in the ``spectranet.commands`` entry-point group (``spectranet train``, ``evaluate``
    and ``pack`` come from the training package this way): the daemon's CLI never imports them by name."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="spectranet.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # the [train] extra is not installed: its commands are simply absent
            logging.getLogger(__name__).debug("subcommands %s not available: %s", ep.name, exc)


def main(argv: list[str] | None = None) -> int:
    # Before numpy loads: the template refinement's matrix products are small, and a second OpenBLAS thread only
    # spins (measured: more than twice the CPU time; bench/bench_refine.py). torch has its own (model.threads).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # import-time chatter
    args = _parser().parse_args(argv)
    from spectranet.streamer.errors import SpectraNetError

    try:
        return int(args.func(args) or 0)
    except SpectraNetError as exc:  # the project's own errors say what to do in one line; no traceback
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
