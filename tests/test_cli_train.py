"""``python -m benchmarks.jarvis``: smoke runs, the comparison table, config files, fast failures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import jarvis
from dgl_crystalframer.cli import train as train_cli
from dgl_crystalframer.config import FRAME_TYPES as FRAMES
from datasets import write_small_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DFT3D = REPO.parent / "shared" / "data" / "jarvis_dft3d_2021_sample"
RESULT_KEYS = ("dataset", "target", "frame", "n_train", "n_val", "n_test", "test_mae", "val_mae", "params",
               "train_seconds", "crystals_per_second")


def _cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.jarvis", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_small_dataset(tmp_path_factory.mktemp("data") / "small.json")


def test_default_dataset_smoke_run(tmp_path):
    """The default path (embedded MP sample, e_form, frame max) end to end, with --preset smoke."""
    out = tmp_path / "out"
    # The sample's 6,277 graphs take ~20 s to build once; keep them in the repo's ignored .cache/ for reruns.
    proc = _cli("--preset", "smoke", "--out", str(out), "--cache-dir", str(REPO / ".cache" / "graphs"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    for key in RESULT_KEYS:
        assert key in res, key
    assert (res["dataset"], res["target"], res["frame"]) == ("megnet_sample", "e_form", "max")
    for name in ("parity.png", "learning_curve.png", "model.pt", "best.pt", "swa.pt", "last.pt", "log.csv"):
        assert (out / name).is_file(), name
    table = proc.stdout
    assert "SAMPLE-SIZE RUN" in table
    assert "CrystalFramer (max frames)" in table and "0.0172" in table  # published MP e_form next to ours
    assert f"{res['test_mae']:.4g}" in table


def test_frame_all_runs_every_frame_on_one_split(small_data, tmp_path, capsys):
    out = tmp_path / "all"
    rc = jarvis.main(["--dataset", str(small_data), "--target", "e_form", "--frame", "all", "--preset", "smoke",
                      "--epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    results = [json.loads((out / f / "results.json").read_text()) for f in FRAMES]
    assert [r["frame"] for r in results] == list(FRAMES)
    assert len({(r["n_train"], r["n_val"], r["n_test"]) for r in results}) == 1
    summary = json.loads((out / "ablation.json").read_text())
    assert [r["frame"] for r in summary] == list(FRAMES)
    table = capsys.readouterr().out
    for frame in FRAMES:
        assert jarvis.FRAME_LABELS[frame] in table


def test_table_puts_published_jarvis_rows_next_to_ours():
    runs = [dict(dataset="dft_3d_2021", target="formation_energy_peratom", unit="eV/atom", frame=f, n_train=44578,
                 n_val=5572, n_test=5572, test_mae=0.03 + 0.001 * k, val_mae=0.031, params=952000, epochs=2000,
                 train_seconds=1000.0, config={}, test_mae_of_train_mean=0.9)
            for k, f in enumerate(("none", "max"))]
    table = jarvis.format_table(runs)
    assert "SAMPLE-SIZE" not in table
    lines = table.splitlines()
    row = next(ln for ln in lines if ln.startswith("+ max frames (CrystalFramer)"))
    assert "0.0263" in row and "0.031" in row
    row = next(ln for ln in lines if ln.startswith("Crystalformer"))
    assert "0.0306" in row and "0.03" in row
    for name in ("+ PCA frames", "+ lattice frames", "+ static local frames", "+ weighted PCA frames", "ALIGNN", "CGCNN"):
        assert any(ln.startswith(name) for ln in lines), name
    mp = jarvis.format_table([dict(runs[1], dataset="megnet", target="gap pbe", frame="static_local")])
    assert "0.185" in mp and "static local frames (not in the paper's table)" in mp


def test_config_file_and_flag_precedence(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("preset: smoke\nepochs: 5\nbatch_size: 4\nlr: 0.001\n")
    args = train_cli.build_parser().parse_args(["--config", str(cfg_file), "--epochs", "2", "--frame", "none"])
    cfg = train_cli.config_from_args(args)
    assert (cfg.preset, cfg.epochs, cfg.batch_size, cfg.lr, cfg.frame) == ("smoke", 2, 4, 0.001, "none")
    assert train_cli.config_from_args(train_cli.build_parser().parse_args([])).preset == "quick"
    cfg_file.write_text("epochs: 5\nepoch: 3\n")
    proc = _cli("--config", str(cfg_file))
    assert proc.returncode == 2
    assert "unknown key(s) 'epoch' (did you mean 'epochs'?)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_model_flag_picks_the_papers_presets():
    from dgl_crystalframer.config import MODEL_PRESETS, model_config

    for name in MODEL_PRESETS:
        cfg = train_cli.config_from_args(train_cli.build_parser().parse_args(["--model", name])).resolved()
        assert cfg.model_config() == model_config(name)
        assert cfg.out_dir.endswith(f"megnet_sample-e_form-{name}")  # presets sharing a frame type get their own folder
    args = train_cli.build_parser().parse_args(["--model", "lightweight", "--layers", "2"])
    assert train_cli.config_from_args(args).model_config() == model_config("lightweight", num_layers=2)
    proc = _cli("--model", "tiny")
    assert proc.returncode == 2 and "invalid choice: 'tiny'" in proc.stderr


def test_missing_jarvis_file_fails_fast_with_one_message(tmp_path):
    empty = tmp_path / "jarvis"
    empty.mkdir()
    t0 = time.time()
    proc = _cli("--dataset", "dft_3d_2021", "--data-dir", str(empty), "--out", str(tmp_path / "o"),
                env={"DGL_CRYSTALFRAMER_OFFLINE": "1"})
    assert time.time() - t0 < 60
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "jdft_3d-8-18-2021.json.zip" in proc.stderr and str(empty) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written


@pytest.mark.skipif(not (SHARED_DFT3D / "jdft_3d-8-18-2021.json.zip").is_file(), reason="../shared data not present")
def test_dft_3d_2021_path_with_the_shared_sample(tmp_path):
    out = tmp_path / "o"
    proc = _cli("--dataset", "dft_3d_2021", "--data-dir", str(SHARED_DFT3D), "--preset", "smoke", "--out", str(out),
                "--cache-dir", str(tmp_path / "cache"), "--quiet", env={"DGL_CRYSTALFRAMER_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["target"] == "formation_energy_peratom"
    assert "JARVIS-DFT 3D 2021" in proc.stdout and "+ static local frames" in proc.stdout


def test_seeds_report_mean_and_spread_on_one_split(small_data, tmp_path, capsys):
    out = tmp_path / "seeds"
    rc = jarvis.main(["--dataset", str(small_data), "--target", "e_form", "--frame", "max", "--preset", "smoke",
                      "--epochs", "2", "--seeds", "3", "--seed", "5", "--unit", "eV/atom", "--out", str(out),
                      "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert rc == 0
    runs = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (5, 6, 7)]
    assert [r["seed"] for r in runs] == [5, 6, 7] and len({r["test_mae"] for r in runs}) == 3
    assert len({tuple(json.loads((out / f"seed-{s}" / "split_ids.json").read_text())["test"]) for s in (5, 6, 7)}) == 1
    summary = json.loads((out / "summary.json").read_text())["max"]
    maes = [r["test_mae"] for r in runs]
    mean = sum(maes) / 3
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(mean)
    assert summary["std"] == pytest.approx((sum((m - mean) ** 2 for m in maes) / 2) ** 0.5)
    table = capsys.readouterr().out
    assert f"{mean:.4g} ± " in table and "(3 seeds)" in table and "(eV/atom)" in table
    assert all(r["unit"] == "eV/atom" for r in runs)


def test_frame_table_says_whether_a_gap_exceeds_the_seed_spread():
    from dgl_crystalframer.cli.train import spread_lines

    def runs(frame, values):
        return [{"frame": frame, "test_mae": v, "seed": k} for k, v in enumerate(values)]

    clear = spread_lines(runs("max", [0.080, 0.081, 0.079]) + runs("none", [0.090, 0.091, 0.089]))
    assert clear[0].startswith("against frame max") and "frame none: +0.01" in clear[1] and "larger than" in clear[1]
    noisy = spread_lines(runs("max", [0.080, 0.095, 0.070]) + runs("none", [0.085, 0.075, 0.092]))
    assert "within the spread" in noisy[1]
    assert spread_lines(runs("max", [0.08]) + runs("none", [0.09])) == []  # one seed: no spread to compare with


def test_dropped_rows_are_shown_and_counted_and_a_damaged_resume_is_one_line(small_data, tmp_path):
    records = json.loads(small_data.read_text())
    bad = {0: float("nan"), 1: "", 2: "not a number"}
    for k, v in bad.items():
        records[k]["e_form"] = v
    data = tmp_path / "holes.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "o"
    args = ("--dataset", str(data), "--target", "e_form", "--preset", "smoke", "--epochs", "1", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--quiet")
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = [records[k]["id"] for k in bad]
    line = [ln for ln in proc.stderr.splitlines() if "skipped" in ln]
    assert len(line) == 1 and f"skipped 3 of {len(records)} entries" in line[0] and ", ".join(ids) in line[0]
    dropped = json.loads((out / "results.json").read_text())["dropped"]
    assert dropped["missing_target"] == 3 and dropped["missing_target_ids"] == ids and dropped["failed_structures"] == 0
    (out / "last.pt").write_bytes(b"\x00" * 100)
    proc = _cli(*args, "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot resume") and f"{out / 'last.pt'}:" in error and "delete" in error


def test_help_gives_each_presets_learning_rate():
    from dgl_crystalframer.config import TRAIN_PRESETS, TrainConfig

    text = " ".join(train_cli.build_parser().format_help().split())
    for name in TRAIN_PRESETS:
        lr = TrainConfig(preset=name).resolved().lr
        assert f"{name} {lr:.0e}".replace("e-0", "e-") in text
    assert "quick 2e-3" in text
