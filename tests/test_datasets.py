"""datasets.py: one spec per named dataset, asked by sources, splits, data and config; OQMD."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from dgl_crystalframer import datasets
from dgl_crystalframer.config import TrainConfig, paper_schedule
from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.datasets import DATASETS, dataset_spec, default_target
from dgl_crystalframer.errors import DataError
from dgl_crystalframer.sources import OFFLINE_ENV
from dgl_crystalframer.splits import paper_split, paper_split_sizes


def test_every_spec_is_complete():
    for name, spec in DATASETS.items():
        assert spec.name == name and spec.default_target in spec.targets
        for key, t in spec.targets.items():
            assert t.key == key and t.unit and t.description
            assert all(j in spec.targets for j in t.joint), (name, key)
            assert spec.resolve_target(key) == key
            assert all(spec.resolve_target(a) == key for a in t.aliases), (name, key)
        assert spec.sample_of is None or spec.sample_of in DATASETS
        assert (spec.jarvis is None) == (spec.sample_of is not None)  # only the embedded sample has no file


def test_aliases_units_and_unknown_names():
    assert DATASETS["dft_3d_2021"].resolve_target("e_form") == "formation_energy_peratom"
    assert DATASETS["megnet"].resolve_target("gap_pbe") == "gap pbe"
    assert DATASETS["megnet_sample"].resolve_target("Shear-Modulus") == "log10_g_vrh"
    assert DATASETS["dft_3d_2021"].targets["ehull"].unit == "eV"
    with pytest.raises(DataError, match="unknown target 'nonsense' for 'oqmd_3d'"):
        DATASETS["oqmd_3d"].resolve_target("nonsense")
    with pytest.raises(DataError, match="unknown dataset .*oqmd_3d"):  # the message lists every named dataset
        load_dataset("no_such_dataset_or_file", "x")
    assert dataset_spec("my.csv") is None and default_target("my.csv") is None


def test_paper_schedules_come_from_the_specs():
    assert paper_schedule("dft_3d_2021", "mbj_bandgap", "none") == dict(epochs=1600, batch_size=256)
    assert paper_schedule("dft_3d_2021", "ehull", "none")["epochs"] == 800
    assert paper_schedule("dft_3d_2021", "ehull", "max")["epochs"] == 2000
    assert paper_schedule("oqmd_3d", "_oqmd_delta_e", "max") == dict(epochs=200, batch_size=1024)
    assert paper_schedule("my_data.csv", "y", "max") == dict(epochs=500, batch_size=128)
    cfg = TrainConfig(dataset="oqmd_3d", preset="paper").resolved()
    assert (cfg.target, cfg.epochs, cfg.batch_size) == ("_oqmd_delta_e", 200, 1024)


# SHA-256 of the int64 index arrays in the reference's published split files for OQMD
# (data/splits/jarvis__oqmd_3d/{val,test}.pkl of omron-sinicx/crystalframer at commit 0921650;
# their train.pkl is not published). Made with
#   hashlib.sha256(np.asarray(pickle.load(f), dtype=np.int64).tobytes()).hexdigest()
OQMD_REFERENCE = {"n": 817636, "val": "59d1bc158a8a5b8d6fe6061600a657856b752a7e2c7beea4276c9adbfe50c82d",
                  "test": "ed16637e1ad31aa8c8132cbc6cda907a2a8de9d39442cff30d1446c5b69b2e48"}


def _sha(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


def test_oqmd_split_is_the_reference_split():
    """The paper split (seed 123) of the 817,636 OQMD entries gives exactly the reference's
    published validation and test ids, so its training ids (the rest of the shuffle) are the
    reference's too."""
    n = OQMD_REFERENCE["n"]
    assert paper_split_sizes(n) == (654108, 81763, 81763)
    train, val, test = paper_split(n, 123)
    assert _sha(val) == OQMD_REFERENCE["val"] and _sha(test) == OQMD_REFERENCE["test"]
    assert len(train) == 654108 and not set(train) & set(val)


def _oqmd_file(folder, entries, n_atoms_of=None):
    """A small all_oqmd.json.zip in jarvis-tools' format, from real MP structures."""
    recs = []
    for k, e in enumerate(entries):
        recs.append({"_oqmd_entry_id": 1000 + k,
                     "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"],
                               "cartesian": False},
                     "_oqmd_delta_e": e["targets"]["e_form"], "_oqmd_stability": 0.01 * k if k != 3 else "na",
                     "_oqmd_band_gap": e["targets"]["gap_pbe"]})
    with zipfile.ZipFile(folder / "all_oqmd.json.zip", "w") as zf:
        zf.writestr("all_oqmd.json", json.dumps(recs))


def test_oqmd_reads_through_jarvis_tools_and_filters_large_training_crystals(tmp_path, sample_entries, cache_dir,
                                                                             monkeypatch):
    _oqmd_file(tmp_path, sample_entries)
    d = load_dataset("oqmd_3d", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert d.info["target"] == "_oqmd_delta_e" and d.info["unit"] == "eV/atom"
    assert d.info["n_skipped_target"] == 1  # delta_e and stability are read together, as the reference does
    n = len(sample_entries) - 1
    assert (len(d.train), len(d.val), len(d.test)) == paper_split_sizes(n)
    assert set(d.train.ids) <= {str(1000 + k) for k in range(len(sample_entries))}
    gap = load_dataset("oqmd_3d", "bandgap", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert gap.info["target"] == "_oqmd_band_gap" and gap.info["n_skipped_target"] == 0

    # the reference trains on crystals of at most 320 atoms; shrink the limit to see it act
    small = dataclasses.replace(DATASETS["oqmd_3d"], train_max_atoms=2)
    monkeypatch.setitem(datasets.DATASETS, "oqmd_3d", small)
    f = load_dataset("oqmd_3d", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert f.info["n_train_too_large"] > 0 and len(f.train) == len(d.train) - f.info["n_train_too_large"]
    assert all(g.num_nodes() <= 2 for g in f.train.graphs)
    assert (len(f.val), len(f.test)) == (len(d.val), len(d.test))  # evaluation sets are never filtered


def test_missing_oqmd_file_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(FileNotFoundError, match=r"oqmd_3d: the jarvis-tools data file all_oqmd.json.zip is not in"):
        load_dataset("oqmd_3d", data_dir=str(tmp_path), progress=False)


def test_a_second_load_comes_from_the_index_without_reading_the_source(tmp_path, sample_entries, cache_dir,
                                                                      monkeypatch, caplog):
    """The split, targets and graph references of a jarvis-tools dataset are kept beside its graphs:
    the next load does not parse the source (GBs of JSON for OQMD) and gives the same splits."""
    from dgl_crystalframer import data

    _oqmd_file(tmp_path, sample_entries)
    first = load_dataset("oqmd_3d", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)

    def no_reading(*a, **k):
        raise AssertionError("the source was read again")

    monkeypatch.setattr(data, "open_source", no_reading)
    with caplog.at_level("WARNING", logger="dgl_crystalframer"):
        again = load_dataset("oqmd_3d", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    assert "skipped 1 of 12 entries" in caplog.text  # what the first load said is said again
    assert again.info["index"] and again.info["n_built"] == 0
    for a, b in zip(first[:3], again[:3]):
        assert a.ids == b.ids and torch.equal(a.targets, b.targets)
        for k in range(len(a)):
            assert torch.equal(a[k][0].edata["rvec"], b[k][0].edata["rvec"])
    assert {k: v for k, v in again.info.items() if k not in ("index", *data._BUILD_STATS)} == \
        {k: v for k, v in first.info.items() if k not in ("index", *data._BUILD_STATS)}
    # another target or split seed is another index; a changed file is another cache
    with pytest.raises(AssertionError, match="read again"):
        load_dataset("oqmd_3d", "bandgap", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
    os.utime(tmp_path / "all_oqmd.json.zip", ns=(1, 1))
    with pytest.raises(AssertionError, match="read again"):
        load_dataset("oqmd_3d", data_dir=str(tmp_path), cache_dir=cache_dir, progress=False)
