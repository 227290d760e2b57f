"""hpo sweeps and reports with injected fake trainers (no model training: seconds, not minutes)."""
import logging
import math
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
yaml = pytest.importorskip("yaml")

from optuna.trial import TrialState  # noqa: E402

from dgl_crystalframer.errors import ConfigError  # noqa: E402
from dgl_crystalframer.hpo import fake  # noqa: E402
from dgl_crystalframer.hpo import space as S  # noqa: E402
from dgl_crystalframer.hpo.cli import main_report, main_sweep  # noqa: E402
from dgl_crystalframer.hpo.objective import Trainer  # noqa: E402
from dgl_crystalframer.hpo.report import run_report  # noqa: E402
from dgl_crystalframer.hpo.sweep import SweepSettings, run_sweep  # noqa: E402

@pytest.fixture
def tmp_path(tmp_path):
    """SQLite commits fsync: on tmpfs (/dev/shm) the studies below run several times faster."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="hpo-test-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


SMALL = S.narrow(S.SPACE, {"frame": "max,none,pca", "num_layers": "2..5"})


def settings(tmp_path, **kw):
    base = dict(study="t", dataset="megnet_sample", target="e_form", n_trials=6, out=tmp_path,
                space=SMALL, fixed={"epochs": 4}, pruner="none", heartbeat_interval=1,
                grace_period=5, sampler_seed=0)
    base.update(kw)
    return SweepSettings(**base)


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_sweep_records_config_and_result(tmp_path, caplog):
    calls = []

    def train(config, cb):
        calls.append(config)
        return fake.train(config, cb)

    with caplog.at_level(logging.INFO, logger="hpo"):
        study = run_sweep(settings(tmp_path), Trainer(train))
    assert (tmp_path / "hpo.db").exists()  # default storage: OUT/hpo.db
    assert states(study) == [TrialState.COMPLETE] * 6
    t = study.best_trial
    cfg = t.user_attrs["config"]
    assert cfg["dataset"] == "megnet_sample" and cfg["preset"] == "quick" and cfg["epochs"] == 4
    assert {k: cfg[k] for k in t.params} == t.params
    assert cfg["out_dir"].endswith("trial_%05d" % t.number)
    assert t.user_attrs["result"]["test_mae"] > 0
    assert t.value == pytest.approx(t.user_attrs["result"]["val_mae"])
    assert sorted(t.intermediate_values) == [1, 2, 3, 4]  # per-epoch val MAE reported
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ")]
    assert len(lines) == 6 and all("COMPLETE" in line and "frame=" in line for line in lines)


def test_resume_is_study_wide_and_settings_must_match(tmp_path):
    run_sweep(settings(tmp_path, n_trials=3), Trainer(fake.train))
    study = run_sweep(settings(tmp_path, n_trials=5), Trainer(fake.train))
    assert len(study.trials) == 5  # resumed: 3 + 2, not 3 + 5
    study = run_sweep(settings(tmp_path, n_trials=5), Trainer(fake.train))
    assert len(study.trials) == 5  # nothing to do
    with pytest.raises(ConfigError, match="other settings"):
        run_sweep(settings(tmp_path, n_trials=6, target="gap"), Trainer(fake.train))
    narrower = S.narrow(SMALL, {"frame": "max"})
    with pytest.raises(ConfigError, match="space"):
        run_sweep(settings(tmp_path, n_trials=6, space=narrower), Trainer(fake.train))
    with pytest.raises(ConfigError, match="objective"):
        run_sweep(settings(tmp_path, n_trials=6, objectives=("mae", "latency")), Trainer(fake.train))


def test_failures_and_nans_are_fail_and_never_stop_the_study(tmp_path):
    def train(config, cb):
        if config["frame"] == "pca":
            raise RuntimeError("CUDA out of memory (simulated)")
        if config["frame"] == "none" and config["num_layers"] == 2:
            cb(1, {"val_mae": 0.1, "train_loss": float("nan")})  # NaN loss during training
        if config["frame"] == "none":
            return {**fake.train(config, cb), "val_mae": float("nan")}  # NaN final MAE
        return fake.train(config, cb)

    sp = S.narrow(SMALL, {"frame": "max,none,pca", "num_layers": "2..3", "num_angle_basis": "64",
                          "lr": "5e-4", "batch_size": "64"})
    study = run_sweep(settings(tmp_path, sampler="grid", space=sp, n_trials=100), Trainer(train))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == S.grid_size(sp) == 3 * 2  # the grid ran to the end
    by_frame = {}
    for t in trials:
        by_frame.setdefault(t.params["frame"], set()).add(t.state)
    assert by_frame == {"max": {TrialState.COMPLETE}, "pca": {TrialState.FAIL},
                        "none": {TrialState.FAIL}}
    errors = {t.user_attrs["error"].split(":")[0] for t in trials if t.state == TrialState.FAIL}
    assert errors == {"RuntimeError", "NonFiniteMetric"}
    nan_loss = [t for t in trials if t.params["frame"] == "none" and t.params["num_layers"] == 2]
    assert all("train_loss" in t.user_attrs["error"] for t in nan_loss)
    assert all(t.state != TrialState.RUNNING for t in trials)


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_pruners_stop_bad_trials(tmp_path, pruner):
    seen_epochs = []

    def train(config, cb):
        bad = config["frame"] == "pca"
        for epoch in range(1, 7):
            seen_epochs.append((config["frame"], epoch))
            cb(epoch, {"val_mae": (1.0 if bad else 0.1) + 1.0 / epoch, "train_loss": 0.1})
        return {"val_mae": 0.1 + 0.1, "test_mae": 0.2, "latency_ms_per_crystal": 1.0}

    study = run_sweep(settings(tmp_path, pruner=pruner, pruner_warmup=1, n_trials=12,
                               sampler="random"), Trainer(train))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert pruned and all(t.params["frame"] == "pca" for t in pruned)
    assert all(t.last_step < 6 for t in pruned)
    assert all("config" in t.user_attrs and "last_epoch" in t.user_attrs for t in pruned)
    assert len([t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 12


def test_multi_objective_pareto_and_report(tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="hpo"):
        study = run_sweep(settings(tmp_path, objectives=("mae", "latency"), pruner="median",
                                   n_trials=8), Trainer(fake.train))
    assert any("pruning disabled" in r.getMessage() for r in caplog.records)
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    assert all(len(t.values) == 2 for t in study.trials)
    assert all(not t.intermediate_values for t in study.trials)
    files = run_report("t", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep")
    out = capsys.readouterr().out
    assert "Pareto front" in out and "latency_ms_per_crystal" in out
    names = {p.name for p in files["plots"]}
    assert "pareto_front.png" in names and "optimization_history.png" in names
    best = yaml.safe_load((tmp_path / "rep" / "best_config.yaml").read_text())
    front_mae = min(t.values[0] for t in study.best_trials)
    assert fake.final_mae(best) * 1.5 == pytest.approx(front_mae)  # val at epoch 4 = 1.5 x final


def test_report_tables_best_config_and_plots(tmp_path, capsys):
    study = run_sweep(settings(tmp_path, n_trials=10, pruner="median"), Trainer(fake.train))
    files = run_report("t", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep",
                       overrides={"preset": "paper"})
    out = capsys.readouterr().out
    assert "frame \\ num_layers" in out and "top " in out
    best = yaml.safe_load(files["best_config"].read_text())
    stored = study.best_trial.user_attrs["config"]
    assert set(best) <= set(stored)  # TrainConfig keys only
    assert set(best) == {"dataset", "target", "preset", "epochs", *S.SPACE}  # what the sweep chose
    assert best["preset"] == "paper" and best["frame"] == study.best_trial.params["frame"]
    assert files["trials_csv"].exists()
    plots = {p.name for p in files["plots"]}
    for name in ("optimization_history", "param_importances"):
        assert f"{name}.png" in plots
        if optuna.visualization.is_available():
            assert f"{name}.html" in plots
    for p in files["plots"]:
        assert p.stat().st_size > 1000


def test_best_config_keys_are_train_config_fields(tmp_path):
    from dgl_crystalframer.config import TrainConfig, read_config_file
    from dgl_crystalframer.hpo.objective import real_trainer

    trainer = real_trainer()
    cfg = trainer.complete({"dataset": "megnet_sample", "target": "e_form", "frame": "max"})
    fields = set(TrainConfig.field_names())
    assert set(cfg) == fields
    study = run_sweep(settings(tmp_path, n_trials=2), Trainer(fake.train, complete=trainer.complete))
    files = run_report("t", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep", plots=False)
    best = yaml.safe_load(files["best_config"].read_text())
    assert set(best) <= fields
    TrainConfig.from_dict(best).resolved()
    assert read_config_file(str(files["best_config"])) == best  # what train --config reads
    assert study.best_trial.user_attrs["config"]["frame"] == best["frame"]


def test_missing_plot_backends_warn_instead_of_crashing(tmp_path, monkeypatch, caplog):
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    run_sweep(settings(tmp_path, n_trials=1), Trainer(fake.train))
    monkeypatch.setattr(vis, "is_available", lambda: False)
    monkeypatch.setattr(vis_mpl, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="hpo"):
        files = run_report("t", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep")
    assert files["plots"] == [] and files["best_config"].exists()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "plotly is not installed" in text and "matplotlib is not installed" in text


def test_cli_end_to_end_with_the_test_hook(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPO_TRAINER", "dgl_crystalframer.hpo.fake:train")
    space_file = tmp_path / "space.yaml"
    space_file.write_text("num_angle_basis: [64]\nbatch_size: 64\nfixed:\n  epochs: 3\n")
    argv = ["--study", "cli", "--dataset", "megnet_sample", "--target", "e_form", "--n-trials", "4",
            "--out", str(tmp_path), "--frames", "max,none", "--layers", "2..3", "--lr", "5e-4",
            "--space", str(space_file), "--sampler", "grid", "--seed", "7"]
    assert main_sweep(argv) == 0
    study = optuna.load_study(study_name="cli", storage=f"sqlite:///{tmp_path}/hpo.db")
    combos = {(t.params["frame"], t.params["num_layers"]) for t in study.trials}
    assert combos == {("max", 2), ("max", 3), ("none", 2), ("none", 3)}  # the whole 2x2 grid
    assert study.trials[0].user_attrs["config"]["epochs"] == 3
    assert study.trials[0].user_attrs["config"]["seed"] == 7
    assert main_report(["--study", "cli", "--out", str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out
    assert (tmp_path / "cli" / "report" / "best_config.yaml").exists()


def test_cli_sweeps_model_presets_and_fine_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("HPO_TRAINER", "dgl_crystalframer.hpo.fake:train")
    common = ["--dataset", "megnet_sample", "--target", "e_form", "--out", str(tmp_path), "--epochs", "2",
              "--sampler", "grid", "--batch-sizes", "64", "--lr", "5e-4"]
    assert main_sweep(["--study", "models", "--n-trials", "3", "--models", "crystalformer,default,lightweight",
                       "--layers", "4", *common]) == 0
    study = optuna.load_study(study_name="models", storage=f"sqlite:///{tmp_path}/hpo.db")
    assert {t.params["model_preset"] for t in study.trials} == {"crystalformer", "default", "lightweight"}
    from dgl_crystalframer.config import TrainConfig, model_config

    for t in study.trials:  # each trial trains exactly the paper's model of its preset
        assert "frame" not in t.params
        cfg = TrainConfig.from_dict(t.user_attrs["config"])
        assert cfg.model_config() == model_config(t.params["model_preset"], num_layers=4)
    assert main_sweep(["--study", "ft", "--n-trials", "1", "--set", "init_from=runs/pre/model.pt", *common]) == 0
    trial = optuna.load_study(study_name="ft", storage=f"sqlite:///{tmp_path}/hpo.db").trials[0]
    assert set(trial.params) == {"lr", "batch_size"}
    assert trial.user_attrs["config"]["init_from"] == "runs/pre/model.pt"


def test_cli_errors_are_clear(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HPO_TRAINER", "dgl_crystalframer.hpo.fake:train")
    common = ["--study", "e", "--dataset", "d", "--target", "t", "--n-trials", "1", "--out", str(tmp_path)]
    with pytest.raises(ConfigError, match="bogus"):
        main_sweep(common + ["--frames", "max,bogus"])
    with pytest.raises(ConfigError, match="searched"):
        main_sweep(common + ["--set", "num_layers=3"])
    with pytest.raises(SystemExit) as e:
        main_sweep(["--help"])
    assert e.value.code == 0
    assert "--n-trials" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no study"):
        run_sweep(settings(tmp_path, n_trials=1), Trainer(fake.train))
        run_report("missing", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep")


def test_fake_trainer_is_deterministic_and_finite():
    cfg = {"frame": "max", "num_layers": 5, "lr": 5e-4, "num_angle_basis": 64, "batch_size": 64}
    seen = []
    r = fake.train({**cfg, "epochs": 3}, lambda e, m: seen.append(m["val_mae"]))
    assert len(seen) == 3 and seen == sorted(seen, reverse=True)
    assert math.isfinite(r["latency_ms_per_crystal"]) and r["val_mae"] == seen[-1]


def test_report_on_a_mistyped_storage_path_writes_nothing(tmp_path, capsys):
    from dgl_crystalframer.cli import main

    for url in (f"journal:{tmp_path}/typo/sweep.journal", f"sqlite:///{tmp_path}/typo.db"):
        assert main(["report", "--study", "s", "--storage", url, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: no ") and "nothing was written" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no journal, no database, no folder


def test_smoke_sweep_best_config_retrains_a_real_model_and_plots_name_the_metric(tmp_path, monkeypatch, capsys):
    import matplotlib.figure

    def train(config, cb):
        return {**fake.train(config, cb), "unit": "eV/atom"}

    run_sweep(settings(tmp_path, n_trials=3, preset="smoke"), Trainer(train))
    labels = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: labels.append((str(path), [(a.get_xlabel(), a.get_ylabel()) for a in fig.axes])))
    files = run_report("t", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep")
    config = yaml.safe_load(files["best_config"].read_text())
    assert config["preset"] == "quick" and "note: the sweep used preset smoke" in capsys.readouterr().out
    axes = {Path(p).stem: a for p, a in labels}
    assert ("epoch", "val_mae (eV/atom)") in axes["intermediate_values"]
    assert any(y == "val_mae (eV/atom)" for _, y in axes["optimization_history"])
    html = tmp_path / "rep" / "plots" / "intermediate_values.html"
    if html.exists():  # plotly installed
        text = html.read_text().replace("\\u002f", "/")  # plotly's JSON escapes slashes
        assert '"text":"val_mae (eV/atom)"' in text and '"text":"epoch"' in text
    # a preset asked for explicitly stays
    files = run_report("t", f"sqlite:///{tmp_path}/hpo.db", tmp_path / "rep2", overrides={"preset": "smoke"}, plots=False)
    assert yaml.safe_load(files["best_config"].read_text())["preset"] == "smoke"


def test_report_marks_a_dead_journal_workers_trial_failed(tmp_path, capsys):
    import os
    import socket

    from dgl_crystalframer.hpo.storage import make_storage

    url = f"journal:{tmp_path}/s.journal"
    study = optuna.create_study(study_name="s", storage=make_storage(url))
    dead, alive = study.ask(), study.ask()  # two RUNNING trials
    dead.set_user_attr("worker", f"{socket.gethostname()}:{2 ** 22 + 4321}")  # a pid that does not exist
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    run_report("s", url, tmp_path / "rep", fail_stale=True, plots=False)
    out = capsys.readouterr().out
    assert "trial 0 RUNNING -> FAIL" in out and "trial 1 RUNNING" in out and "still runs" in out
    study = optuna.load_study(study_name="s", storage=make_storage(url))
    assert states(study) == [TrialState.FAIL, TrialState.RUNNING]
    assert "no longer runs" in study.trials[0].user_attrs["error"]
    assert main_report(["--study", "s", "--storage", url, "--out", str(tmp_path), "--fail-trial", "1", "--no-plots"]) == 0
    assert states(optuna.load_study(study_name="s", storage=make_storage(url))) == [TrialState.FAIL, TrialState.FAIL]
    with pytest.raises(ConfigError, match="no RUNNING trial 7"):
        run_report("s", url, tmp_path / "rep", fail_trials=[7], plots=False)
