"""hpo/storage.py: where a study lives for one worker (SQLite), several processes on one machine
(a journal file) and many machines (PostgreSQL, tests/test_hpo_workers.py)."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
from optuna.trial import TrialState  # noqa: E402

from dgl_crystalframer.hpo.storage import WORKERS_ATTR, make_storage, warn_if_shared_sqlite  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def test_journal_file_storage_is_shared_by_several_processes(tmp_path):
    journal = tmp_path / "sweep.journal"
    env = {**os.environ, "HPO_TRAINER": "dgl_crystalframer.hpo.fake:train", "HPO_FAKE_EPOCH_SECONDS": "0.05",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "dgl_crystalframer", "hpo", "--study", "j", "--n-trials", "8", "--epochs", "3",
           "--storage", f"journal:{journal}", "--out", str(tmp_path), "--pruner", "none", "--frames", "max,none"]
    workers = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    logs = [w.communicate(timeout=240)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    study = optuna.load_study(study_name="j", storage=make_storage(f"journal:{journal}"))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 8 and all(t.state != TrialState.FAIL for t in study.trials)
    workers_seen = {t.user_attrs["worker"] for t in complete}
    assert len(workers_seen) == 2  # both processes ran trials of the one study
    assert not any("advises against SQLite" in log for log in logs)


def _study(url):
    return optuna.create_study(study_name="s", storage=make_storage(url, heartbeat=False), load_if_exists=True)


def test_a_second_worker_on_sqlite_is_warned(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/hpo.db"
    study = _study(url)
    with caplog.at_level(logging.WARNING, logger="hpo"):
        warn_if_shared_sqlite(study, url)  # the first worker: nothing to say
    assert "advises against SQLite" not in caplog.text
    # another live process on this machine has joined (our parent stands in for it)
    import socket

    other = f"{socket.gethostname()}:{os.getppid()}"
    study.set_user_attr(WORKERS_ATTR, {**study.user_attrs[WORKERS_ATTR], other: 0.0})
    with caplog.at_level(logging.WARNING, logger="hpo"):
        warn_if_shared_sqlite(_study(url), url)
    assert "advises against SQLite" in caplog.text and "journal:FILE" in caplog.text and "postgresql" in caplog.text
    # a worker that has exited is forgotten, not warned about
    caplog.clear()
    dead = f"{socket.gethostname()}:{2 ** 22 + 12345}"
    study.set_user_attr(WORKERS_ATTR, {dead: 0.0})
    with caplog.at_level(logging.WARNING, logger="hpo"):
        warn_if_shared_sqlite(_study(url), url)
    assert "advises against SQLite" not in caplog.text and dead not in _study(url).user_attrs[WORKERS_ATTR]


def test_journal_and_postgres_workers_are_not_warned(tmp_path, caplog):
    import socket

    url = f"journal:{tmp_path}/j.journal"
    study = _study(url)
    study.set_user_attr(WORKERS_ATTR, {f"{socket.gethostname()}:{os.getppid()}": 0.0})
    with caplog.at_level(logging.WARNING, logger="hpo"):
        warn_if_shared_sqlite(study, url)
    assert "advises against SQLite" not in caplog.text
