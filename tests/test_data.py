"""dgl_crystalframer.data: sources, splits, bad input, graph cache (fast: real structures, few of them)."""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import random
import time
import zipfile

import numpy as np
import pytest
import torch

from dgl_crystalframer import graph_cache, splits
from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.batch import collate
from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.sources import OFFLINE_ENV, SAMPLE_PATH
from dgl_crystalframer.targets import TARGET_UNITS, resolve_target
from dgl_crystalframer.splits import MEGNET_FIXED_SIZES, paper_split, paper_split_sizes

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "jarvis_dft3d_2021_sample")
SHARED = os.path.abspath(SHARED)
if not os.path.isdir(SHARED):
    SHARED = "/work/shared/data/jarvis_dft3d_2021_sample"
HAVE_SHARED = os.path.isfile(os.path.join(SHARED, "jdft_3d-8-18-2021.json.zip"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("graph_cache"))


@pytest.fixture(scope="module")
def sample_entries():
    """12 small real crystals (with e_form) from the embedded sample."""
    with gzip.open(SAMPLE_PATH, "rb") as fh:
        doc = json.loads(fh.read())
    small = [e for e in doc["entries"] if len(e["species"]) <= 6 and e["targets"]["e_form"] is not None]
    return small[:: max(1, len(small) // 12)][:12]


def _structure(e):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"])


_FAKE = []


def _fake_graph(*args, **kwargs):
    if not _FAKE:
        g = dgl.graph(([0], [0]), num_nodes=1)
        g.ndata["species"] = torch.zeros(1, 98)
        g.edata["rvec"] = torch.zeros(1, 3)
        _FAKE.append(g)
    return _FAKE[0]


# ------------------------------------------------------------------------------ splits


def test_paper_split_sizes_match_spec():
    """The reference code's sizes for the usable entries of each JARVIS target (docs/METHOD.md 6):
    n_train = int(0.8 n), the one or two entries left over are unused."""
    assert paper_split_sizes(55723) == (44578, 5572, 5572)
    assert paper_split_sizes(18172) == (14537, 1817, 1817)
    assert paper_split_sizes(55371) == (44296, 5537, 5537)
    assert paper_split_sizes(69239, MEGNET_FIXED_SIZES) == (60000, 5000, 4239)


def test_paper_split_is_the_reference_algorithm():
    n = 1003
    train, val, test = paper_split(n, 123)
    ids = list(range(n))
    random.seed(123)
    random.shuffle(ids)
    assert train == ids[:802] and val == ids[-(100 + 100):-100] and test == ids[-100:]
    assert len(set(train) | set(val) | set(test)) == n - 1  # ids[802] is unused, as in the reference


# ------------------------------------------------------------------------------ embedded sample


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


# ------------------------------------------------------------------------------ users' data


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


def test_duplicate_ids_are_kept_and_renamed(tmp_path, sample_entries, cache_dir, caplog):
    recs = [{"jid": "same", "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"]},
             "e_form": e["targets"]["e_form"]} for e in sample_entries]
    (tmp_path / "dup.json").write_text(json.dumps(recs))
    with caplog.at_level(logging.WARNING, logger="dgl_crystalframer"):
        d = load_dataset(str(tmp_path / "dup.json"), "e_form", cache_dir=cache_dir, progress=False)
    assert "duplicate ids" in caplog.text
    assert sorted(d.train.ids + d.val.ids + d.test.ids) == sorted(["same"] + [f"same#{k}" for k in range(2, 13)])


def test_zero_usable_entries_is_an_error(tmp_path, sample_entries, cache_dir):
    recs = [{"jid": e["id"], "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"]},
             "e_form": "na"} for e in sample_entries[:3]]
    (tmp_path / "none.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match="no entries with a usable value"):
        load_dataset(str(tmp_path / "none.json"), "e_form", cache_dir=cache_dir, progress=False)


# ------------------------------------------------------------------------------ graph cache


def _write_csv(tmp_path, entries, name="c.csv"):
    import pandas as pd

    rows = [{"id": e["id"], "structure": _structure(e).to(fmt="cif"), "y": e["targets"]["e_form"]} for e in entries]
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return str(tmp_path / name)


def test_cache_hit_avoids_rebuilding(tmp_path, sample_entries, monkeypatch):
    path = _write_csv(tmp_path, sample_entries)
    cache = str(tmp_path / "cache")
    d1 = load_dataset(path, "y", cache_dir=cache, progress=False)
    assert d1.info["n_built"] == 12

    def fail(*a, **k):
        raise AssertionError("graph rebuilt despite a valid cache")

    monkeypatch.setattr(graph_cache, "build_graph", fail)
    d2 = load_dataset(path, "y", cache_dir=cache, progress=False)
    assert d2.info["n_built"] == 0 and d2.info["n_from_cache"] == 12
    assert d2.train.ids == d1.train.ids
    g1, g2 = d1.train.graphs[0], d2.train.graphs[0]
    assert torch.equal(g1.edata["rvec"], g2.edata["rvec"]) and torch.equal(g1.ndata["species"], g2.ndata["species"])
    # another cutoff is another cache entry
    monkeypatch.undo()
    d3 = load_dataset(path, "y", cache_dir=cache, cutoff=4.0, progress=False)
    assert d3.info["n_built"] == 12 and d3.train.graphs[0].num_edges() < g1.num_edges()


def test_corrupt_or_stale_cache_is_rebuilt(tmp_path, sample_entries, caplog):
    path = _write_csv(tmp_path, sample_entries)
    cache = str(tmp_path / "cache")
    load_dataset(path, "y", cache_dir=cache, progress=False)
    bins = glob.glob(os.path.join(cache, "*", "chunk-*.bin"))
    assert bins
    for b in bins:
        with open(b, "wb") as fh:
            fh.write(b"garbage" * 100)
    with caplog.at_level(logging.WARNING, logger="dgl_crystalframer"):
        d = load_dataset(path, "y", cache_dir=cache, progress=False)
    assert d.info["n_built"] == 12 and "discarding" in caplog.text
    # truncated graph file / unreadable manifest
    bins = glob.glob(os.path.join(cache, "*", "chunk-*.bin"))
    with open(bins[0], "r+b") as fh:
        fh.truncate(os.path.getsize(bins[0]) // 2)
    assert load_dataset(path, "y", cache_dir=cache, progress=False).info["n_built"] == 12
    manifests = glob.glob(os.path.join(cache, "*", "chunk-*.json"))
    for m in manifests:
        open(m, "w").write("{not json")
    assert load_dataset(path, "y", cache_dir=cache, progress=False).info["n_built"] == 12
    # the source changed (size/mtime): another key, graphs rebuilt
    time.sleep(0.01)
    _write_csv(tmp_path, sample_entries[:11])
    assert load_dataset(path, "y", cache_dir=cache, progress=False).info["n_built"] == 11


def test_unwritable_cache_is_not_fatal(tmp_path, sample_entries, caplog):
    path = _write_csv(tmp_path, sample_entries[:4])
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="dgl_crystalframer"):
        d = load_dataset(path, "y", cache_dir=str(blocker), progress=False)
    assert len(d.train) + len(d.val) + len(d.test) == 4 and "continuing without caching" in caplog.text


def test_interrupted_build_resumes(tmp_path, sample_entries, monkeypatch):
    path = _write_csv(tmp_path, sample_entries)
    cache = str(tmp_path / "cache")
    monkeypatch.setattr(graph_cache, "CHUNK_SIZE", 4)
    real = graph_cache.build_graph
    calls = {"n": 0}

    def interrupt_after_seven(*a, **k):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(graph_cache, "build_graph", interrupt_after_seven)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(path, "y", cache_dir=cache, progress=False)
    monkeypatch.setattr(graph_cache, "build_graph", real)
    d = load_dataset(path, "y", cache_dir=cache, progress=False)
    assert d.info["n_from_cache"] == 7 and d.info["n_built"] == 5


# ------------------------------------------------------------------------------ jarvis sources


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


@pytest.mark.skipif(not HAVE_SHARED, reason="../shared/data/jarvis_dft3d_2021_sample is not here")
def test_leaderboard_package_membership_is_used(tmp_path, cache_dir, monkeypatch):
    """A jarvis_leaderboard package on the path provides the membership (fake package, real ids)."""
    with zipfile.ZipFile(os.path.join(SHARED, "jdft_3d-8-18-2021.json.zip")) as zf:
        recs = json.loads(zf.read(zf.namelist()[0]))
    ids = [r["jid"] for r in recs]
    split = {"train": {i: "0" for i in ids[:200]}, "val": {i: "0" for i in ids[200:220]}, "test": {i: "0" for i in ids[220:240]}}
    bench = tmp_path / "pkgs" / "jarvis_leaderboard" / "benchmarks" / "AI" / "SinglePropertyPrediction"
    bench.mkdir(parents=True)
    (tmp_path / "pkgs" / "jarvis_leaderboard" / "__init__.py").write_text("")
    with zipfile.ZipFile(bench / "dft_3d_ehull.json.zip", "w") as zf:
        zf.writestr("dft_3d_ehull.json", json.dumps(split))
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    d = load_dataset("dft_3d_2021", "ehull", data_dir=SHARED, split="leaderboard", cache_dir=cache_dir, progress=False)
    assert (len(d.train), len(d.val), len(d.test)) == (200, 20, 20) and "dft_3d_ehull" in d.info["split"]
    assert d.info["n_unassigned"] == 11


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


def test_unknown_source_and_aliases():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no_such_dataset_or_file", "x")
    assert resolve_target("dft_3d_2021", "e_form") == "formation_energy_peratom"
    assert resolve_target("megnet", "gap_pbe") == "gap pbe"
    assert resolve_target("megnet_sample", "shear") == "log10_g_vrh"
    assert TARGET_UNITS["dft_3d_2021"]["ehull"] == "eV"
