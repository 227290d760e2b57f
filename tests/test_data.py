"""data.py: load_dataset end to end: the embedded sample, skipped and failed entries, the shared dft_3d sample."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from dgl_crystalframer import graph_cache, splits
from dgl_crystalframer.batch import collate
from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.splits import paper_split_sizes

from datasets import HAVE_SHARED, SHARED, _fake_graph


# ---------------------------------------------------------------------------------- embedded sample


def test_sample_bulk_loads_with_paper_split(cache_dir):
    d = load_dataset("megnet_sample", "bulk", cache_dir=cache_dir, progress=False)
    assert d.info["target"] == "log10_k_vrh" and d.info["unit"] == "log10(GPa)"
    assert (len(d.train), len(d.val), len(d.test)) == (944, 118, 118)
    assert d.info["split"].startswith("paper")
    assert not set(d.train.ids) & set(d.test.ids) and all(i.startswith("mp-") for i in d.val.ids)
    g, y = d.train[0]
    assert y.shape == (1,) and y.dtype == torch.float32 and 0.0 < float(y) < 3.5
    assert {"species", "Z", "pos", "lattice"} <= set(g.ndata) and "rvec" in g.edata
    bg, ys = collate([d.train[i] for i in range(4)])
    assert bg.batch_size == 4 and ys.shape == (4, 1)
    loader = torch.utils.data.DataLoader(d.val, batch_size=16, collate_fn=collate)
    assert sum(b[1].shape[0] for b in loader) == 118


def test_sample_eform_gap_use_leaderboard_split(monkeypatch):
    monkeypatch.setattr(graph_cache, "build_graph", _fake_graph)
    for target in ("e_form", "gap pbe"):
        d = load_dataset("megnet_sample", target, progress=False, use_cache=False)
        assert (len(d.train), len(d.val), len(d.test)) == (5481, 434, 362)
        assert d.info["split"] == "leaderboard" and d.info["n_skipped_target"] == 7
    d = load_dataset("megnet_sample", "e_form", split="paper", progress=False, use_cache=False)
    assert (len(d.train), len(d.val), len(d.test)) == paper_split_sizes(6277)
    with pytest.raises(ValueError, match="no split"):
        load_dataset("megnet_sample", "shear", split="leaderboard", progress=False, use_cache=False)
    with pytest.raises(ValueError, match="unknown target"):
        load_dataset("megnet_sample", "nonsense", progress=False, use_cache=False)


# ----------------------------------------------------------------------- skipped and failed entries


def test_missing_targets_and_bad_structures_are_skipped_and_logged(tmp_path, sample_entries, cache_dir, caplog):
    records = []
    for k, e in enumerate(sample_entries):
        value = {0: "na", 1: float("nan"), 2: None}.get(k, e["targets"]["e_form"])
        records.append({"jid": e["id"], "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"],
                                                  "elements": e["species"], "cartesian": False}, "e_form": value})
    records[3]["e_form"] = "inf"
    overlapping = {"lattice_mat": [[4, 0, 0], [0, 4, 0], [0, 0, 4]], "coords": [[0, 0, 0], [0, 0, 0.001]],
                   "elements": ["Na", "Cl"], "cartesian": False}
    records.append({"jid": "BROKEN-1", "atoms": overlapping, "e_form": -1.0})
    records.append({"jid": "BROKEN-2", "atoms": {"lattice_mat": [[1, 0, 0]], "coords": [], "elements": []}, "e_form": -1.0})
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with caplog.at_level(logging.INFO, logger="dgl_crystalframer"):
        d = load_dataset(str(tmp_path / "bad.json"), "e_form", cache_dir=cache_dir, progress=False)
    assert d.info["n_skipped_target"] == 4
    assert set(d.info["failed"]) == {"BROKEN-1", "BROKEN-2"}
    assert "apart" in d.info["failed"]["BROKEN-1"]
    log = caplog.text
    assert "skipped 4 of 14 entries" in log
    assert "BROKEN-1" in log and "BROKEN-2" in log and "skipped 2 structure(s)" in log
    all_ids = d.train.ids + d.val.ids + d.test.ids
    assert "BROKEN-1" not in all_ids and len(all_ids) == 14 - 4 - 2
    # cached failures are reported again, never silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dgl_crystalframer"):
        d2 = load_dataset(str(tmp_path / "bad.json"), "e_form", cache_dir=cache_dir, progress=False)
    assert d2.info["n_built"] == 0 and "BROKEN-1" in caplog.text


def test_zero_usable_entries_is_an_error(tmp_path, sample_entries, cache_dir):
    recs = [{"jid": e["id"], "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"]},
             "e_form": "na"} for e in sample_entries[:3]]
    (tmp_path / "none.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match="no entries with a usable value"):
        load_dataset(str(tmp_path / "none.json"), "e_form", cache_dir=cache_dir, progress=False)


# ----------------------------------------------------------------------------- shared dft_3d sample


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/data/jarvis_dft3d_2021_sample is not here")
def test_dft_3d_2021_shared_sample_paper_and_leaderboard(cache_dir, monkeypatch):
    monkeypatch.setattr(splits, "leaderboard_membership", lambda task: None)  # use the records' field
    d = load_dataset("dft_3d_2021", "formation_energy_peratom", data_dir=SHARED, cache_dir=cache_dir, progress=False)
    assert (len(d.train), len(d.val), len(d.test)) == paper_split_sizes(251) == (200, 25, 25)
    assert d.info["unit"] == "eV/atom" and d.info["n_failed"] == 0
    # the first three targets share one split
    d2 = load_dataset("dft_3d_2021", "optb88vdw_bandgap", data_dir=SHARED, cache_dir=cache_dir, progress=False)
    assert d2.test.ids == d.test.ids
    lb = load_dataset("dft_3d_2021", "e_form", data_dir=SHARED, split="leaderboard", cache_dir=cache_dir, progress=False)
    assert (len(lb.train), len(lb.val), len(lb.test)) == (210, 18, 23)
    mbj = load_dataset("dft_3d_2021", "mbj_bandgap", data_dir=SHARED, cache_dir=cache_dir, progress=False)
    assert mbj.info["n_skipped_target"] == 119 and mbj.info["n_unassigned"] == 1  # 132 usable: int(0.8 n) + 2 int(0.1 n) = 131
    assert (len(mbj.train), len(mbj.val), len(mbj.test)) == paper_split_sizes(132) == (105, 13, 13)
