"""``python -m dgl_crystalframer predict``: checkpoint + structure files -> predictions in original units."""
from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dgl_crystalframer.predict import Predictor, expand_inputs
from dgl_crystalframer.training import train_and_evaluate
from datasets import SAMPLE, tiny_config, write_small_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 2 epochs, and a folder of structure files of some of its test crystals."""
    root = tmp_path_factory.mktemp("predict")
    data = write_small_dataset(root / "small.json")
    res = train_and_evaluate(tiny_config(data, root / "run", epochs=2))
    from pymatgen.core import Lattice, Structure

    assert res["n_test"] >= 4
    test_ids = {r["id"] for r in csv.DictReader(open(root / "run" / "test_predictions.csv"))}
    entries = [e for e in json.loads(gzip.decompress(SAMPLE.read_bytes()))["entries"] if e["id"] in test_ids][:4]
    folder = root / "structures"
    folder.mkdir()
    files = []
    for k, e in enumerate(entries):
        s = Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"])
        path = folder / (f"{e['id']}.cif" if k % 2 == 0 else f"{e['id']}.vasp")
        s.to(filename=str(path), fmt="cif" if k % 2 == 0 else "poscar")
        files.append(path)
    (folder / "notes.txt").write_text("not a structure, and not picked up from the folder\n")
    broken = root / "broken.cif"
    broken.write_text("data_broken\n_cell_length_a 3.0\nthis is not a CIF\n")
    return {"root": root, "ckpt": root / "run" / "model.pt", "folder": folder, "files": files, "broken": broken,
            "ids": [e["id"] for e in entries]}


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgl_crystalframer", "predict", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO)


def test_cli_predicts_files_and_folders_and_reports_bad_ones(trained, tmp_path):
    out_csv = tmp_path / "preds.csv"
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(trained["files"][0]), str(trained["broken"]),
                    str(trained["folder"]), str(tmp_path / "missing.cif"), "--out", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["id", "e_form"]  # a user dataset: no unit known
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == 1 + len(trained["files"])  # the file given directly, then the folder's structure files
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and any("broken.cif" in ln for ln in errors) and any("missing.cif" in ln for ln in errors)
    assert "Traceback" not in proc.stderr
    assert list(csv.reader(open(out_csv))) == rows


def test_predictions_match_the_training_run_in_original_units(trained):
    p = Predictor(str(trained["ckpt"]), device="cpu")
    ids, values, errors = p.predict_files([str(f) for f in trained["files"]])
    assert not errors and len(values) == len(trained["files"])
    expected = {r["id"]: float(r["prediction"]) for r in csv.DictReader(open(trained["root"] / "run" / "test_predictions.csv"))}
    for path, v in zip(ids, values):
        mp_id = Path(path).stem
        assert v == pytest.approx(expected[mp_id], abs=2e-4), mp_id  # CIF/POSCAR text rounds positions
    # batching does not change the numbers
    single = Predictor(str(trained["ckpt"]), device="cpu", batch_size=1).predict_files([str(f) for f in trained["files"]])[1]
    np.testing.assert_allclose(single, values, rtol=1e-5, atol=1e-6)


def test_nothing_predictable_exits_non_zero(trained, tmp_path):
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(trained["broken"]))
    assert proc.returncode == 1
    assert "nothing could be predicted" in proc.stderr and "Traceback" not in proc.stderr
    proc = _predict("--checkpoint", str(tmp_path / "nope.pt"), str(trained["files"][0]))
    assert proc.returncode == 2 and "nope.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_expand_inputs(trained, tmp_path):
    files, errors = expand_inputs([str(trained["folder"]), str(tmp_path / "nothing_here")])
    assert sorted(Path(f).name for f in files) == sorted(f.name for f in trained["files"])
    assert len(errors) == 1 and "nothing_here" in errors[0][0]
