"""Logging set-up, and the front door: what a newcomer reads when a broker or database is not there.

- ``configure_logging``: human-readable text, or one JSON object per line for log shippers.
- ``RateLimitFilter``: the same message at most once per ``interval_s`` seconds; the next one that gets through
  carries the count of the repeats suppressed meanwhile. librdkafka retries a refused connection every few tens of
  milliseconds and logs each attempt (189 identical lines in 15 s before this filter), so its log is routed through
  Python logging (``runtime/kafka_io.py``) and this filter rather than left on stderr.
- ``Problem``, ``setting_names`` and ``describe_database_error``: one line per condition that names what is
  unreachable, the setting that names it (config key and environment variable) and what to do, never a password.
  ``spectranet check`` prints the same three parts as ``FAIL <check>: <what> (<setting>) -> <fix>``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

__all__ = ["configure_logging", "JsonFormatter", "RateLimitFilter", "REPEAT_INTERVAL_S", "Problem", "normalise",
           "setting_names", "redacted_url", "describe_database_error"]

REPEAT_INTERVAL_S = 60.0  # the same front-door or librdkafka message at most once a minute


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# Parts of librdkafka's messages that change from one repeat to the next without changing what they say.
_VOLATILE = re.compile(r"\s*\(after \d+ms in state \w+(?:, \d+ identical error\(s\) suppressed)?\)|\d+ms\b")


def normalise(text: str) -> str:
    """``text`` without librdkafka's timings, so that repeats of one condition compare equal."""
    return _VOLATILE.sub("", text)


def _default_key(record: logging.LogRecord) -> str:
    """What makes two records "the same message": ``extra={"dedupe_key": ...}`` if given, else the normalised text."""
    key = getattr(record, "dedupe_key", None)
    return str(key) if key is not None else normalise(record.getMessage())


class RateLimitFilter(logging.Filter):
    """At most one message per key every ``interval_s`` seconds (thread-safe).

    The first occurrence passes at once; repeats within the interval are counted and dropped; the first repeat after
    the interval passes with ``(N repeats suppressed in the last S s)`` appended. Use it as a ``logging.Filter``
    (``logger.addFilter``), or call ``admit(key)`` directly (``runtime/kafka_io.py`` does, for librdkafka's log).
    """

    def __init__(self, interval_s: float = REPEAT_INTERVAL_S, *,
                 key: Callable[[logging.LogRecord], str] = _default_key, max_keys: int = 1024) -> None:
        super().__init__()
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, not {interval_s}")
        self.interval_s = interval_s
        self._key = key
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._seen: dict[object, tuple[float, int]] = {}  # key -> (last let through at, repeats suppressed since)

    def admit(self, key: object) -> str | None:
        """None: drop this repeat. Otherwise let it through, with this suffix (empty if nothing was suppressed)."""
        now = time.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._seen[key] = (last[0], last[1] + 1)
                return None
            if len(self._seen) >= self._max_keys:  # forget keys quiet for longer than the interval
                self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval_s}
            self._seen[key] = (now, 0)
        if last is None or not last[1]:
            return ""
        return f" ({last[1]} repeats suppressed in the last {now - last[0]:.0f} s)"

    def filter(self, record: logging.LogRecord) -> bool:
        suffix = self.admit((record.name, record.levelno, self._key(record)))
        if suffix is None:
            return False
        if suffix:
            record.msg, record.args = record.getMessage() + suffix, None
        return True


@dataclass(frozen=True)
class Problem:
    """Something the daemon needs and cannot use: what, the setting that names it, what to do."""

    what: str      # "Kafka broker 127.0.0.1:9092 unreachable: Connection refused"
    setting: str   # "kafka.bootstrap_servers / SPECTRANET_KAFKA__BOOTSTRAP_SERVERS"
    fix: str       # "start a broker there or set it; `spectranet demo` runs with an embedded one"

    def __str__(self) -> str:
        return f"{self.what} ({self.setting}): {self.fix}"


def setting_names(path: str) -> str:
    """``kafka.bootstrap_servers`` -> ``kafka.bootstrap_servers / SPECTRANET_KAFKA__BOOTSTRAP_SERVERS``: the config
    key and the environment variable that set it (``config.py``: ``SPECTRANET_`` prefix, ``__`` between levels)."""
    return f"{path} / SPECTRANET_{path.upper().replace('.', '__')}"


def redacted_url(url: str) -> str:
    """The database URL with its password replaced by ``***`` (or a placeholder if it cannot be parsed)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


_UNREACHABLE = ("connection refused", "could not connect", "connection failed", "timeout expired",
                "could not translate host name", "name or service not known", "no route to host",
                "network is unreachable", "connection timed out")


def describe_database_error(exc: BaseException, url: str, *, from_file: bool = False) -> Problem:
    """What went wrong connecting to ``url``, the setting and the fix; the password never appears.

    ``exc`` is the SQLAlchemy or driver exception. Conditions are told apart by the driver's SQLSTATE where it has
    one (28P01 wrong password, 28000 rejected role, 3D000 no such database) and by libpq's text otherwise.
    """
    where = redacted_url(url)
    setting = setting_names("database.url") + (", read from database.url_file" if from_file else "")
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    text = " ".join(str(orig).split())
    try:
        parsed = make_url(url)
        password, user, dbname, backend = parsed.password, parsed.username, parsed.database, parsed.get_backend_name()
    except ArgumentError:
        password, user, dbname, backend = None, None, None, "database"
    if password:  # drivers do not echo it, but no message is trusted to leave it out
        text = text.replace(str(password), "***")
    low = text.lower()
    if sqlstate == "28P01" or "password authentication failed" in low or "no password supplied" in low:
        return Problem(f"database {where} refused the password of user {user!r}", setting,
                       "put the right password in the URL (or in the file named by database.url_file)")
    if sqlstate == "28000" or ("role" in low and "does not exist" in low):
        return Problem(f"database {where} refused user {user!r}: {text[:200]}", setting,
                       "create the role, allow it in pg_hba.conf, or set another user")
    if sqlstate == "3D000" or (dbname and f'database "{dbname}" does not exist' in low):
        return Problem(f"database {where}: database {dbname!r} does not exist", setting,
                       "create it (createdb) or set another one")
    if backend == "sqlite":
        return Problem(f"database {where} cannot be opened: {text[:200]}", setting,
                       "check that its folder exists and is writable")
    if any(s in low for s in _UNREACHABLE):
        return Problem(f"database {where} unreachable", setting,
                       "start PostgreSQL there or set it; `spectranet demo` runs on a SQLite file")
    return Problem(f"database {where} failed: {text[:300]}", setting, "check the server's log")
