"""``python -m dgl_crystalframer predict``: checkpoint(s) + structure files, folders or datasets -> predictions in
original units, flagged against the training domain; ensembles."""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgl_crystalframer.graph import build_graph
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
    train_and_evaluate(tiny_config(data, root / "run2", epochs=2, seed=7))  # a second ensemble member
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
    return {"root": root, "ckpt": root / "run" / "model.pt", "ckpt2": root / "run2" / "model.pt", "folder": folder,
            "files": files, "broken": broken, "ids": [e["id"] for e in entries], "data": data}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgl_crystalframer", "predict", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO)


def test_cli_predicts_files_and_folders_and_reports_bad_ones(trained, tmp_path):
    out_csv = tmp_path / "preds.csv"
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(trained["files"][0]), str(trained["broken"]),
                    str(trained["folder"]), str(tmp_path / "missing.cif"), "--out", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["id", "e_form", "in_domain", "domain_note"]  # a user dataset: no unit known
    ids = [r[0] for r in rows[1:]]
    assert len(ids) == 1 + len(trained["files"])  # the file given directly, then the folder's structure files
    assert all(np.isfinite(float(r[1])) for r in rows[1:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and any("broken.cif" in ln for ln in errors) and any("missing.cif" in ln for ln in errors)
    assert "Traceback" not in proc.stderr
    assert list(csv.reader(open(out_csv))) == rows
    assert b"\r" not in out_csv.read_bytes()  # the file has stdout's line ends


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


def test_nothing_predictable_and_bad_checkpoints_exit_2_with_one_line(trained, tmp_path):
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(trained["broken"]))
    assert proc.returncode == 2
    assert "nothing could be predicted" in proc.stderr.splitlines()[-1] and "Traceback" not in proc.stderr
    proc = _predict("--checkpoint", str(tmp_path / "nope.pt"), str(trained["files"][0]))
    assert proc.returncode == 2 and "nope.pt" in proc.stderr and "Traceback" not in proc.stderr
    # a random file and a truncated checkpoint: the file named, never torch's advice to load unsafely
    random_file = tmp_path / "random.pt"
    random_file.write_bytes(np.random.default_rng(0).bytes(4000))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained["ckpt"].read_bytes()[:5000])
    crafted = tmp_path / "crafted.pt"  # a pickle that would run a command when loaded unsafely
    torch.save(_RunsACommand(), crafted)
    for bad, why in ((random_file, "not a PyTorch checkpoint file"), (truncated, "truncated or damaged"),
                     (crafted, "refused, not a plain checkpoint: it asks to load posix.system")):
        proc = _predict("--checkpoint", str(bad), str(trained["files"][0]))
        line = one_error_line(proc)
        assert str(bad) in line and why in line and "weights_only" not in proc.stderr, proc.stderr


class _RunsACommand:
    def __reduce__(self):
        return (os.system, ("true",))


def _old_checkpoint(src: Path, dst: Path, **meta) -> Path:
    """A copy of a checkpoint without the training-domain record (as older versions wrote), meta changed."""
    ckpt = torch.load(src, weights_only=True)
    ckpt["meta"].pop("domain")
    ckpt["meta"].update(meta)
    torch.save(ckpt, dst)
    return dst


def test_crystals_outside_the_training_domain_are_flagged(trained, tmp_path):
    from pymatgen.core import Lattice, Structure

    meta = torch.load(trained["ckpt"], weights_only=True)["meta"]
    domain = meta["domain"]
    assert domain["n_crystals"] == 40 and domain["edges_per_atom"][0] > 1 and domain["atoms_per_cell"][0] >= 1
    unseen = [e for e in ("Ne", "Ar", "Kr", "Xe", "Rn") if e not in domain["elements"]][:2]  # noble gases: none here
    Structure(Lattice.cubic(4.0), unseen, [[0, 0, 0], [0.5, 0.5, 0.5]]).to(filename=str(tmp_path / "UXe.cif"))
    lonely = Structure(Lattice.cubic(100.0), [domain["elements"][0]], [[0, 0, 0]])  # its graph: the self edge only
    lonely.to(filename=str(tmp_path / "lonely.cif"))
    inputs = [str(trained["files"][0]), str(tmp_path / "UXe.cif"), str(tmp_path / "lonely.cif")]
    proc = _predict("--checkpoint", str(trained["ckpt"]), *inputs)
    assert proc.returncode == 0, proc.stderr
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert rows[inputs[0]]["in_domain"] == "yes" and rows[inputs[0]]["domain_note"] == ""
    assert rows[inputs[1]]["in_domain"] == "no" and f"elements {', '.join(unseen)} not in training" in rows[inputs[1]]["domain_note"]
    assert rows[inputs[2]]["in_domain"] == "no" and "an atom with 1 edge (training" in rows[inputs[2]]["domain_note"]
    warning = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "2 of 3 crystals are outside the training domain" in warning[0]
    # --strict: an error, one line
    line = one_error_line(_predict("--strict", "--checkpoint", str(trained["ckpt"]), *inputs))
    assert "2 of 3 crystals" in line and "UXe.cif" in line
    assert _predict("--strict", "-c", str(trained["ckpt"]), inputs[0]).returncode == 0
    # a checkpoint without the record: unknown, said once
    old = _old_checkpoint(trained["ckpt"], tmp_path / "old.pt")
    proc = _predict("--checkpoint", str(old), *inputs)
    assert proc.returncode == 0 and {r["in_domain"] for r in csv.DictReader(io.StringIO(proc.stdout))} == {"unknown"}
    assert "records no training domain" in proc.stderr
    assert "records no training domain" in one_error_line(_predict("--strict", "--checkpoint", str(old), inputs[0]))


def test_datasets_as_training_takes_them_keep_ids_and_give_the_mae(trained, tmp_path):
    import pandas as pd
    from pymatgen.core import Lattice, Structure

    entries = {e["id"]: e for e in json.loads(gzip.decompress(SAMPLE.read_bytes()))["entries"]}
    ids = trained["ids"]
    p = Predictor(str(trained["ckpt"]), device="cpu")
    expected = dict(zip(*p.predict_files([str(f) for f in trained["files"]])[:2]))
    expected = {Path(k).stem: v for k, v in expected.items()}
    # a CSV: id, CIF text, the target (one missing, one not a number)
    structures = [Structure(Lattice(entries[i]["lattice"]), entries[i]["species"], entries[i]["frac_coords"]) for i in ids]
    given = [entries[i]["targets"]["e_form"] for i in ids]
    table = pd.DataFrame({"id": ids, "structure": [s.to(fmt="cif") for s in structures],
                          "e_form": [given[0], given[1], "", "n/a"]})
    table.to_csv(tmp_path / "mine.csv", index=False)
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(tmp_path / "mine.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [r["id"] for r in rows] == ids
    for r in rows:
        assert float(r["e_form"]) == pytest.approx(expected[r["id"]], abs=2e-4)
    assert float(rows[0]["error"]) == pytest.approx(float(rows[0]["e_form"]) - given[0], abs=1e-3)
    assert rows[2]["e_form (given)"] == "" and rows[2]["error"] == ""
    mae = np.mean([abs(float(rows[k]["e_form"]) - given[k]) for k in (0, 1)])
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MAE")]
    assert line == [f"MAE {mae:.4g} over the 2 crystals with a given e_form (2 without)"]
    # a folder with id_prop.csv (ALIGNN convention): its 'target' column
    folder = tmp_path / "alignn"
    folder.mkdir()
    for i, s in zip(ids, structures):
        s.to(filename=str(folder / f"{i}.cif"))
    (folder / "id_prop.csv").write_text("".join(f"{i}.cif,{g}\n" for i, g in zip(ids, given)))
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(folder))
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert proc.returncode == 0 and [r["id"] for r in rows] == [f"{i}.cif" for i in ids]
    assert all(r["error"] != "" for r in rows) and "over the 4 crystals" in proc.stderr
    # the training JSON dataset itself: every entry, its own ids
    r = p.predict([str(trained["data"])])
    assert len(r.ids) == 64 and r.ids[0] == json.loads(trained["data"].read_text())[0]["id"]
    assert r.mae()[1] == 64 and not r.errors
    # a column the dataset lacks: one line
    assert "band_gap" in one_error_line(_predict("--target", "band_gap", "-c", str(trained["ckpt"]), str(tmp_path / "mine.csv")))


def test_an_ensemble_gives_the_mean_and_the_spread(trained, tmp_path, monkeypatch):
    files = [str(f) for f in trained["files"]]
    a = Predictor(str(trained["ckpt"]), device="cpu").predict(files)
    b = Predictor(str(trained["ckpt2"]), device="cpu").predict(files)
    assert a.std is None
    import dgl_crystalframer.predict as predict_module

    built = []
    monkeypatch.setattr(predict_module, "build_graph", lambda *args, **kw: built.append(1) or build_graph(*args, **kw))
    both = Predictor([str(trained["ckpt"]), str(trained["ckpt2"])], device="cpu").predict(files)
    assert len(built) == len(files)  # graphs built once, not once per member
    np.testing.assert_allclose(both.values, (a.values + b.values) / 2, rtol=1e-6)
    np.testing.assert_allclose(both.std, np.abs(a.values - b.values) / np.sqrt(2), rtol=1e-6)
    assert np.all(both.std > 0)
    proc = _predict("--checkpoint", str(trained["ckpt"]), str(trained["ckpt2"]), *files)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert proc.returncode == 0 and list(rows[0])[:3] == ["id", "e_form", "std"]
    np.testing.assert_allclose([float(r["std"]) for r in rows], both.std, rtol=1e-2)
    # members of another target: one line
    other = _old_checkpoint(trained["ckpt2"], tmp_path / "gap.pt", target="band_gap", domain={})
    line = one_error_line(_predict("--checkpoint", str(trained["ckpt"]), str(other), files[0]))
    assert "disagree on the target" in line and "gap.pt" in line


def test_expand_inputs(trained, tmp_path):
    files, errors = expand_inputs([str(trained["folder"]), str(tmp_path / "nothing_here")])
    assert sorted(Path(f).name for f in files) == sorted(f.name for f in trained["files"])
    assert len(errors) == 1 and "nothing_here" in errors[0][0]
