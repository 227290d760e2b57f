"""graph_cache.py: cache hits, corrupt or stale caches, an unwritable cache, an interrupted build."""
from __future__ import annotations

import glob
import logging
import os
import time

import pytest
import torch

from dgl_crystalframer import graph_cache
from dgl_crystalframer.data import load_dataset

from datasets import _write_csv


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
