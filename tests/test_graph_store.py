"""graph_store.py and the out-of-core path: stored graphs come back bit for bit, datasets hold
references rather than graphs, parallel and concurrent builds give the same cache."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from dgl_crystalframer import graph_cache
from dgl_crystalframer.batch import collate
from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.graph import build_graph
from dgl_crystalframer.graph_store import GraphList, GraphRef, decode_graph, encode_graph

from crystals import sample_structures
from datasets import _write_csv


def assert_same_graph(a, b):
    assert a.num_nodes() == b.num_nodes() and a.num_edges() == b.num_edges()
    for x, y in zip(a.edges(), b.edges()):
        assert torch.equal(x, y)
    for data_a, data_b in ((a.ndata, b.ndata), (a.edata, b.edata)):
        assert set(data_a.keys()) == set(data_b.keys())
        for k in data_a.keys():
            assert data_a[k].dtype == data_b[k].dtype and torch.equal(data_a[k], data_b[k]), k


def test_records_give_back_the_same_graphs():
    disordered = Structure(Lattice.cubic(3.9), [{"Fe": 0.5, "Co": 0.25}, "O", {"Sr": 1.0}],
                           [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.5]])
    for s in sample_structures(6) + [disordered]:
        g = build_graph(s)
        raw = encode_graph(g)
        assert len(raw) % 8 == 0 and len(raw) < 25 * g.num_edges() + 40 * g.num_nodes() + 200
        assert_same_graph(g, decode_graph(raw))


def _read_in_worker(ds):
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2)
    return [bg for bg, _ in loader]


def test_datasets_hold_references_read_in_every_process(tmp_path, sample_entries):
    path = _write_csv(tmp_path, sample_entries)
    d = load_dataset(path, "y", cache_dir=str(tmp_path / "cache"), progress=False)
    mem = load_dataset(path, "y", progress=False, use_cache=False)
    assert isinstance(d.train.graphs, GraphList) and not d.train.graphs._memory  # nothing held in memory
    assert d.train.ids == mem.train.ids
    for k in range(len(d.train)):
        assert_same_graph(d.train[k][0], mem.train[k][0])
        assert d.train.graphs.num_nodes(k) == mem.train[k][0].num_nodes()
    # the training-domain record reads stored crystals without building their graphs, to the same result
    from dgl_crystalframer.domain import domain_of
    from dgl_crystalframer.graph_store import summary

    stored = [d.train.graphs.item(k) for k in range(len(d.train))]
    assert all(isinstance(r, GraphRef) for r in stored)
    assert [summary(r) for r in stored] == [summary(mem.train[k][0]) for k in range(len(mem.train))]
    assert domain_of(stored) == domain_of(g for g, _ in mem.train)
    # forked DataLoader workers open the files themselves
    for bg, ref in zip(_read_in_worker(d.train), _read_in_worker(mem.train)):
        assert_same_graph(bg, ref)


def test_parallel_build_stores_the_same_graphs(tmp_path, sample_entries, monkeypatch):
    path = _write_csv(tmp_path, sample_entries)
    monkeypatch.setattr(graph_cache, "PARALLEL_MIN", 1)
    one = load_dataset(path, "y", cache_dir=str(tmp_path / "one"), progress=False, build_workers=1)
    two = load_dataset(path, "y", cache_dir=str(tmp_path / "two"), progress=False, build_workers=2)
    assert one.info["n_built"] == two.info["n_built"] == len(sample_entries)
    refs = list(two.train.graphs._paths)
    assert len(refs) > 1  # several chunks: the work was split
    for a, b in zip(one.train.graphs, two.train.graphs):
        assert encode_graph(a) == encode_graph(b)


def _load_counting(args):
    path, cache = args
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool (DataLoader workers do the same)
    return load_dataset(path, "y", cache_dir=cache, progress=False, build_workers=1).info["n_built"]


def test_concurrent_processes_build_a_cache_once(tmp_path, sample_entries):
    """Two processes (two DDP ranks on one node, or two runs) start on an empty cache: one builds,
    the other waits for the lock and reads."""
    path = _write_csv(tmp_path, sample_entries)
    cache = str(tmp_path / "cache")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        built = pool.map(_load_counting, [(path, cache)] * 2)
    assert sorted(built) == [0, len(sample_entries)]


def test_graph_list_mixes_stored_and_in_memory_graphs(tmp_path):
    gs = [build_graph(s) for s in sample_structures(3)]
    from dgl_crystalframer.graph_store import write_records

    index = write_records(str(tmp_path / "g.bin"), gs[:2])
    items = [GraphRef(str(tmp_path / "g.bin"), *index[1]), gs[2], GraphRef(str(tmp_path / "g.bin"), *index[0])]
    lst = GraphList(items)
    assert len(lst) == 3 and [lst.num_nodes(i) for i in range(3)] == [g.num_nodes() for g in (gs[1], gs[2], gs[0])]
    assert_same_graph(lst[0], gs[1]) and lst[1] is gs[2]
    assert_same_graph(lst[-1], gs[0])
    with pytest.raises(OSError, match="short read"):
        GraphList([GraphRef(str(tmp_path / "g.bin"), index[1][0], index[1][1] + 1000, 1)])[0]
    assert np.array_equal(lst._offset, [index[1][0], 0, index[0][0]])


def test_a_build_worker_that_dies_is_replaced_by_this_process(tmp_path, sample_entries, monkeypatch, caplog):
    """A crashed worker (killed, out of memory, a segfault) must not hang the build: the slices it
    left are built here, and every graph is there."""
    import os

    parent = os.getpid()
    real = graph_cache.build_graph

    def crash_in_a_worker(structure, cutoff=None, entry_id=None):
        if os.getpid() != parent and entry_id == sample_entries[5]["id"]:
            os._exit(1)
        return real(structure, cutoff=cutoff, entry_id=entry_id)

    path = _write_csv(tmp_path, sample_entries)
    monkeypatch.setattr(graph_cache, "PARALLEL_MIN", 1)
    monkeypatch.setattr(graph_cache, "build_graph", crash_in_a_worker)
    with caplog.at_level("WARNING", logger="dgl_crystalframer"):
        d = load_dataset(path, "y", cache_dir=str(tmp_path / "cache"), progress=False, build_workers=2)
    assert "a worker process died" in caplog.text
    assert d.info["n_built"] == len(sample_entries) and d.info["n_failed"] == 0
    assert len(d.train) + len(d.val) + len(d.test) == len(sample_entries)
