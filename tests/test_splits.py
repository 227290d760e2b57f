"""splits.py: the paper's split sizes and algorithm, leaderboard membership."""
from __future__ import annotations

import json
import os
import random
import zipfile

import pytest

from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.datasets import DATASETS
from dgl_crystalframer.splits import paper_split, paper_split_sizes

from datasets import HAVE_SHARED, SHARED


def test_paper_split_sizes_match_the_official_code():
    """The reference code's sizes for the usable entries of each JARVIS target (docs/METHOD.md 6):
    n_train = int(0.8 n), the one or two entries left over are unused."""
    assert paper_split_sizes(55723) == (44578, 5572, 5572)
    assert paper_split_sizes(18172) == (14537, 1817, 1817)
    assert paper_split_sizes(55371) == (44296, 5537, 5537)
    assert paper_split_sizes(69239, DATASETS["megnet"].targets["e_form"].fixed_split) == (60000, 5000, 4239)


def test_paper_split_is_the_reference_algorithm():
    n = 1003
    train, val, test = paper_split(n, 123)
    ids = list(range(n))
    random.seed(123)
    random.shuffle(ids)
    assert train == ids[:802] and val == ids[-(100 + 100):-100] and test == ids[-100:]
    assert len(set(train) | set(val) | set(test)) == n - 1  # ids[802] is unused, as in the reference


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


# ------------------------------------------------------------------------------ users' data


def _csv_with_split(tmp_path, sample_entries, labels, name="s.csv"):
    import pandas as pd

    from datasets import _structure

    rows = [{"id": e["id"], "structure": _structure(e).to(fmt="cif"), "y": e["targets"]["e_form"], "split": lb}
            for e, lb in zip(sample_entries, labels)]
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return str(tmp_path / name)


def test_train_and_test_only_gets_a_seeded_validation_set_from_train(tmp_path, sample_entries, cache_dir, caplog):
    """matbench-style data: a split column with train and test only."""
    labels = ["train"] * 10 + ["test"] * 2
    path = _csv_with_split(tmp_path, sample_entries, labels)
    with caplog.at_level("WARNING", logger="dgl_crystalframer"):
        d = load_dataset(path, "y", cache_dir=cache_dir, progress=False)
    assert (len(d.train), len(d.val), len(d.test)) == (9, 1, 2)  # 10% of train, at least one
    assert "carved from train" in d.info["split"] and "1 of the 10 training entries" in caplog.text
    train_ids = {e["id"] for e, lb in zip(sample_entries, labels) if lb == "train"}
    assert set(d.val.ids) <= train_ids and not set(d.val.ids) & set(d.train.ids)
    again = load_dataset(path, "y", cache_dir=cache_dir, progress=False)
    assert again.val.ids == d.val.ids  # seeded
    other = load_dataset(path, "y", cache_dir=cache_dir, progress=False, seed=7)
    assert sorted(other.train.ids + other.val.ids) == sorted(d.train.ids + d.val.ids)


def test_no_split_column_is_a_random_80_10_10_using_every_entry(tmp_path, sample_entries, cache_dir):
    from datasets import _write_csv

    d = load_dataset(_write_csv(tmp_path, sample_entries), "y", cache_dir=cache_dir, progress=False)
    assert d.info["split"].startswith("random") and (len(d.train), len(d.val), len(d.test)) == (10, 1, 1)
    assert d.info["n_unassigned"] == 0


def test_a_given_validation_set_is_used_as_given(tmp_path, sample_entries, cache_dir):
    labels = ["train"] * 8 + ["val"] * 2 + ["test"] * 2
    d = load_dataset(_csv_with_split(tmp_path, sample_entries, labels), "y", cache_dir=cache_dir, progress=False)
    assert d.info["split"] == "column" and (len(d.train), len(d.val), len(d.test)) == (8, 2, 2)
