"""sources.py: users' CSV files, folders and JSON records, the jarvis-tools sources, duplicate ids."""
from __future__ import annotations

import json
import logging
import os
import time
import zipfile

import numpy as np
import pytest
import torch

from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.sources import OFFLINE_ENV
from dgl_crystalframer.splits import paper_split_sizes

from datasets import _structure


# -------------------------------------------------------------------------------------- users' data


def test_csv_structure_and_path_columns(tmp_path, sample_entries, cache_dir):
    import pandas as pd

    rows_text, rows_path = [], []
    for k, e in enumerate(sample_entries):
        s = _structure(e)
        text = s.to(fmt="cif") if k % 2 else s.to(fmt="poscar")
        fname = f"{e['id']}.cif" if k % 2 else f"POSCAR-{e['id']}"
        (tmp_path / fname).write_text(text)
        rows_text.append({"id": e["id"], "structure": text, "e_form": e["targets"]["e_form"]})
        rows_path.append({"id": e["id"], "path": fname, "e_form": e["targets"]["e_form"]})
    pd.DataFrame(rows_text).to_csv(tmp_path / "inline.csv", index=False)
    pd.DataFrame(rows_path).to_csv(tmp_path / "paths.csv", index=False)
    for name in ("inline.csv", "paths.csv"):
        d = load_dataset(str(tmp_path / name), "e_form", cache_dir=cache_dir, progress=False)
        assert (len(d.train), len(d.val), len(d.test)) == (10, 1, 1), name
        assert d.info["n_failed"] == 0
        got = dict(zip(d.train.ids + d.val.ids + d.test.ids, torch.cat([d.train.targets, d.val.targets, d.test.targets])[:, 0].tolist()))
        for e in sample_entries:
            assert got[e["id"]] == pytest.approx(e["targets"]["e_form"], abs=1e-6)
    # a split column is honoured
    df = pd.DataFrame(rows_text)
    df["split"] = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    df.to_csv(tmp_path / "with_split.csv", index=False)
    d = load_dataset(str(tmp_path / "with_split.csv"), "e_form", cache_dir=cache_dir, progress=False)
    assert (len(d.train), len(d.val), len(d.test)) == (8, 2, 2) and d.info["split"] == "column"
    assert d.test.ids == [e["id"] for e in sample_entries[-2:]]


def test_folder_with_id_prop(tmp_path, sample_entries, cache_dir):
    lines = []
    for e in sample_entries:
        (tmp_path / f"{e['id']}.vasp").write_text(_structure(e).to(fmt="poscar"))
        lines.append(f"{e['id']}.vasp,{e['targets']['e_form']}")
    (tmp_path / "id_prop.csv").write_text("\n".join(lines) + "\n")
    d = load_dataset(str(tmp_path), cache_dir=cache_dir, progress=False)
    assert (len(d.train), len(d.val), len(d.test)) == (10, 1, 1)
    assert d.info["source"] == "folder" and d.info["n_failed"] == 0


def test_json_and_json_zip_records(tmp_path, sample_entries, cache_dir):
    records = []
    for e in sample_entries:
        records.append({
            "jid": e["id"],
            "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"], "cartesian": False},
            "e_form": e["targets"]["e_form"],
        })
    (tmp_path / "recs.json").write_text(json.dumps(records))
    with zipfile.ZipFile(tmp_path / "recs.json.zip", "w") as zf:
        zf.writestr("recs.json", json.dumps(records))
    sizes = []
    for name in ("recs.json", "recs.json.zip"):
        d = load_dataset(str(tmp_path / name), "e_form", cache_dir=cache_dir, progress=False)
        sizes.append((len(d.train), len(d.val), len(d.test)))
        assert d.info["n_failed"] == 0
    assert sizes == [(10, 1, 1)] * 2


def test_duplicate_ids_are_kept_and_renamed(tmp_path, sample_entries, cache_dir, caplog):
    recs = [{"jid": "same", "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"]},
             "e_form": e["targets"]["e_form"]} for e in sample_entries]
    (tmp_path / "dup.json").write_text(json.dumps(recs))
    with caplog.at_level(logging.WARNING, logger="dgl_crystalframer"):
        d = load_dataset(str(tmp_path / "dup.json"), "e_form", cache_dir=cache_dir, progress=False)
    assert "duplicate ids" in caplog.text
    assert sorted(d.train.ids + d.val.ids + d.test.ids) == sorted(["same"] + [f"same#{k}" for k in range(2, 13)])


# ----------------------------------------------------------------------------------- jarvis sources


def test_megnet_source_through_jarvis_tools(tmp_path, sample_entries, cache_dir, caplog):
    """A (small, real-structure) megnet.json.zip in data_dir is read by jarvis-tools offline."""
    recs = []
    for k, e in enumerate(sample_entries):
        recs.append({"id": e["id"], "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"],
                                             "cartesian": False},
                     "e_form": e["targets"]["e_form"], "gap pbe": e["targets"]["gap_pbe"] if k != 5 else "na",
                     "bulk modulus": 100.0 + k if k % 3 else "na", "shear modulus": "na"})
    with zipfile.ZipFile(tmp_path / "megnet.json.zip", "w") as zf:
        zf.writestr("megnet.json", json.dumps(recs))
    with caplog.at_level(logging.INFO, logger="dgl_crystalframer"):
        d = load_dataset("megnet", "e_form", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert d.info["n_skipped_target"] == 1  # e_form and gap pbe are filtered jointly
    assert (len(d.train), len(d.val), len(d.test)) == paper_split_sizes(11) and "60000/5000/4239" in caplog.text
    b = load_dataset("megnet", "bulk", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert b.info["target"] == "bulk modulus" and "GPa" in b.info["note"]
    assert torch.allclose(b.train.targets.max(), torch.tensor(np.log10(111.0), dtype=torch.float32))


def test_missing_jarvis_file_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("dft_3d_2021", "formation_energy_peratom", data_dir=str(tmp_path), progress=False)
    assert time.perf_counter() - t0 < 10
    msg = str(info.value)
    assert "jdft_3d-8-18-2021.json.zip" in msg and str(tmp_path) in msg and "https://" in msg
    with pytest.raises(FileNotFoundError, match="megnet.json.zip"):
        load_dataset("megnet", "e_form", data_dir=str(tmp_path), progress=False)
    assert not os.listdir(tmp_path)  # nothing half-written
