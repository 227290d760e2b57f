"""Where a study lives, by how many workers share it:

* ``sqlite:///FILE`` (the default, ``OUT/hpo.db``): one worker at a time.  Optuna advises against
  SQLite for parallel workers (database locks, lost updates); a second worker joining a SQLite
  study gets a warning that names the alternatives (``warn_if_shared_sqlite``).
* ``journal:FILE``: Optuna's journal file (``JournalFileBackend``), safe for several processes on
  one machine (or a file system with working locks).  It keeps no heartbeats.
* ``postgresql://...`` (any SQLAlchemy URL): many workers on many machines, with heartbeats: every
  running trial writes one every ``heartbeat_interval`` seconds; before each new trial, every
  worker marks RUNNING trials whose heartbeat is older than ``grace_period`` as FAIL and, with
  max_retry > 0, re-queues their parameters as a WAITING trial that the next free worker runs.
  So a worker killed mid-trial (SIGKILL, OOM killer, preempted node) loses nothing.
"""
from __future__ import annotations

import inspect
import logging
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import optuna

# Optuna is imported inside the functions: the command line reads the constants above without it
# (``hpo --help``, and a clear message when the [hpo] extra is missing).

log = logging.getLogger("hpo")
JOURNAL_PREFIX = "journal:"
WORKERS_ATTR = "hpo_workers"

DEFAULT_DB = "hpo.db"
HEARTBEAT_INTERVAL = 60  # seconds
GRACE_PERIOD = 180  # seconds; > 2 intervals so a slow database round trip is not a death


def default_url(out_dir: str | Path) -> str:
    path = Path(out_dir).resolve() / DEFAULT_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def normalize_url(url: str) -> str:
    """postgres:// and postgresql:// -> an installed driver (SQLAlchemy 2.1 defaults to psycopg 3,
    this project installs psycopg2-binary). Explicit drivers (postgresql+psycopg://) are kept."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgres", "postgresql"):
        import importlib.util

        for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
            if importlib.util.find_spec(module) is not None:
                return f"postgresql+{driver}://{rest}"
        raise UserError("PostgreSQL storage needs a driver: pip install psycopg2-binary (part of the [hpo] extra)")
    return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # several local workers on one SQLite file wait for the lock instead of failing
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def _retry_callback(max_retry: int):
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or getattr(
        optuna.storages, "RetryFailedTrialCallback"
    )
    inner = cls(max_retry=max_retry)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log.warning(
            "trial %d FAIL: worker %s stopped sending heartbeats (killed?)%s",
            trial.number,
            trial.user_attrs.get("worker", "?"),
            "; its parameters are queued again" if max_retry > 0 else "",
        )
        if max_retry > 0:
            inner(study, trial)

    return callback


def make_storage(
    url: str,
    heartbeat_interval: int = HEARTBEAT_INTERVAL,
    grace_period: int | None = GRACE_PERIOD,
    max_retry: int = 1,
    heartbeat: bool = True,
    attempts: int = 5,
) -> optuna.storages.BaseStorage:
    """A journal file storage for ``journal:FILE``, else an RDBStorage with heartbeats (creation is
    retried: workers may race to create the tables)."""
    import optuna

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    url = normalize_url(url)
    kwargs: dict = {"engine_kwargs": _engine_kwargs(url)}
    if heartbeat:
        params = inspect.signature(optuna.storages.RDBStorage).parameters
        cb_name = (
            "heartbeat_stale_trial_callback"
            if "heartbeat_stale_trial_callback" in params
            else "failed_trial_callback"
        )
        kwargs.update(
            heartbeat_interval=int(heartbeat_interval),
            grace_period=int(grace_period) if grace_period else None,
            **{cb_name: _retry_callback(max_retry)},
        )
    for attempt in range(1, attempts + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as e:  # sqlalchemy errors when two workers create the schema at once
            if attempt == attempts or "Failed to import" in str(e):
                raise
            log.info("storage not ready (%s); retrying", type(e).__name__)
            time.sleep(0.2 + random.random() * attempt)
    raise AssertionError("unreachable")


def warn_if_shared_sqlite(study: optuna.Study, url: str) -> None:
    """Register this worker on the study; on SQLite, warn when another worker is alive on it.

    Workers are recorded as ``host:pid`` in a study attribute; one on this host counts as alive
    while its process exists, one on another host always does (SQLite over a network file system
    is worse still)."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    workers = dict(study.user_attrs.get(WORKERS_ATTR) or {})
    others = [w for w in workers if w != me and worker_alive(w) is not False]
    study.set_user_attr(WORKERS_ATTR, {**{w: workers[w] for w in others}, me: time.time()})
    if others and url.startswith("sqlite"):
        log.warning("worker %s joins study %r on SQLite while %s run(s) on it too: Optuna advises against SQLite "
                    "for parallel workers (locks, lost updates). Use --storage journal:FILE for several processes "
                    "on one machine, or --storage postgresql://... for several machines.",
                    me, study.study_name, ", ".join(others))


def worker_alive(worker: str) -> bool | None:
    """Whether the worker ``host:pid`` still runs: True or False on this host, None (unknown) on another."""
    name, _, pid = str(worker).rpartition(":")
    if name != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # exists, owned by another user
        return True


def require_existing(url: str) -> None:
    """A study to read must exist: a mistyped journal or SQLite path is an error, not a new, empty
    file (opening a storage creates one)."""
    if url.startswith(JOURNAL_PREFIX):
        path = Path(url[len(JOURNAL_PREFIX):]).expanduser()
        what = "journal file"
    elif url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///"):]).expanduser()
        what = "SQLite database"
    else:
        return
    if not path.is_file():
        raise UserError(f"no {what} {path}: check the path in --storage (nothing was written)")


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
