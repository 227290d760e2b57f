"""Many workers, one study: two `python -m hpo` processes share a study; one is SIGKILLed mid-trial.

The survivor must mark the dead worker's RUNNING trial FAIL (heartbeat + grace period), re-run its
parameters, and finish the study-wide trial budget. On a real PostgreSQL server (the one in
$HPO_TEST_POSTGRES_URL, which .ci/run starts, or one started here with initdb + pg_ctl on
127.0.0.1) the trials are real: dgl_crystalframer training (smoke preset, a tiny model on 40 real
MP crystals). On SQLite they use the fast fake trainer of the documented HPO_TRAINER hook, so that
variant is about storage and workers only.
"""
import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from dgl_crystalframer.hpo.storage import normalize_url  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_TRIALS = 12
GRACE = 3


def _local_postgres():
    spec = importlib.util.spec_from_file_location("local_postgres", REPO / "scripts" / "local_postgres.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("HPO_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    pg = _local_postgres()
    try:
        server = pg.start()
    except pg.PostgresUnavailable as e:
        pytest.skip(f"no PostgreSQL server can be started here: {e}")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["postgres", "sqlite"])
def setup(request, tmp_path):
    """(storage URL, extra `python -m hpo` arguments, extra environment) of one test variant."""
    if request.param == "sqlite":
        return (f"sqlite:///{tmp_path}/hpo.db", ["--dataset", "megnet_sample", "--epochs", "4"],
                {"HPO_TRAINER": "dgl_crystalframer.hpo.fake:train", "HPO_FAKE_EPOCH_SECONDS": "0.25"})
    from dgl_crystalframer.data import load_dataset
    from datasets import write_small_dataset

    data = write_small_dataset(tmp_path / "small.json")
    cache = tmp_path / "cache"
    load_dataset(str(data), "e_form", cache_dir=str(cache), progress=False)  # build the graphs once
    args = ["--dataset", str(data), "--preset", "smoke", "--epochs", "6", "--layers", "1",
            "--set", f"cache_dir={cache}", "--set", "threads=1"]
    return request.getfixturevalue("postgres_url"), args, {}


def _worker(study, url, out, log_path, args, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPO_")}
    env.update(env_extra, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "hpo", "--study", study, "--target", "e_form", "--n-trials", str(N_TRIALS),
           "--storage", url, "--out", str(out), "--pruner", "none", "--heartbeat-interval", "1",
           "--grace-period", str(GRACE), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _running_trial_of(storage, study_name, pid):
    """A RUNNING trial of worker `pid` that has reported at least one epoch (mid-trial)."""
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("worker", "").endswith(f":{pid}") and t.intermediate_values:
            return t
    return None


def test_killed_worker_trial_is_failed_and_retried(setup, tmp_path):
    storage_url, args, env = setup
    study_name = f"kill-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    survivor = _worker(study_name, storage_url, tmp_path, logs[0], args, env)
    victim = _worker(study_name, storage_url, tmp_path, logs[1], args, env)
    storage = optuna.storages.RDBStorage(normalize_url(storage_url))
    try:
        deadline = time.time() + 90
        killed = None
        while killed is None:
            assert time.time() < deadline, "victim never started a trial:\n" + logs[1].read_text()
            assert victim.poll() is None, "victim exited early:\n" + logs[1].read_text()
            killed = _running_trial_of(storage, study_name, victim.pid)
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        t_kill = time.time()
        rc = survivor.wait(timeout=180)
    finally:
        for p in (survivor, victim):
            if p.poll() is None:
                p.kill()
    survivor_log = logs[0].read_text()
    assert rc == 0, survivor_log
    assert time.time() - t_kill > GRACE  # the survivor outlived the grace period

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))  # none lost
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials), \
        [(t.number, t.state.name) for t in trials]
    dead = trials[killed.number]
    assert dead.state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE, survivor_log
    assert retries[0].params == dead.params
    assert retries[0].user_attrs["worker"].endswith(f":{survivor.pid}")
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert N_TRIALS <= len(done) <= N_TRIALS + 1  # study-wide budget (a parallel worker may overshoot by one)
    assert [t for t in trials if t.state == TrialState.FAIL] == [dead]
    assert f"trial {killed.number} FAIL" in survivor_log and "heartbeat" in survivor_log
    assert f"[retry of trial {killed.number}]" in survivor_log
    if "HPO_TRAINER" not in env:  # real training: every finished trial has a real result
        for t in done:
            assert t.user_attrs["result"]["n_train"] == 40 and t.user_attrs["result"]["params"] > 0
