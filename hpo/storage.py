"""Optuna RDB storage: SQLite by default, any SQLAlchemy URL (PostgreSQL for many machines).

Heartbeats: every running trial writes a heartbeat every `heartbeat_interval` seconds. Before each
new trial, every worker marks RUNNING trials whose heartbeat is older than `grace_period` as FAIL
(optuna.storages.fail_stale_trials) and, with max_retry > 0, re-queues their parameters as a
WAITING trial that the next free worker runs (RetryHeartbeatStaleTrialCallback). So a worker
killed mid-trial (SIGKILL, OOM killer, preempted node) loses nothing.
"""
from __future__ import annotations

import inspect
import logging
import random
import time
import warnings
from pathlib import Path

import optuna

log = logging.getLogger("hpo")

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
        raise SystemExit("hpo: PostgreSQL storage needs a driver: pip install psycopg2-binary")
    return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # several local workers on one SQLite file wait for the lock instead of failing
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def _retry_callback(max_retry: int):
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
) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeats; retries creation (workers racing to create the tables)."""
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


def redact(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url
