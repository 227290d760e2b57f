"""The embedded real-data sample: loads, matches its README, and (BUILD_SAMPLE_TEST=1) rebuilds byte for byte."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_DIR = os.path.join(ROOT, "dgl_crystalframer", "sample")
SAMPLE = os.path.join(SAMPLE_DIR, "megnet_sample.json.gz")
README = os.path.join(SAMPLE_DIR, "README.md")
TARGETS = ("e_form", "gap_pbe", "log10_k_vrh", "log10_g_vrh")


@pytest.fixture(scope="module")
def doc():
    with gzip.open(SAMPLE, "rb") as fh:
        return json.loads(fh.read())


def _readme_counts():
    rows = {}
    with open(README, encoding="utf-8") as fh:
        for line in fh:
            m = re.match(r"\| `(\w+)` \| [^|]+ \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| ([^|]+) \|", line)
            if m and m.group(1) in TARGETS:
                rows[m.group(1)] = tuple(int(m.group(k)) for k in range(2, 6)) + (m.group(6).strip(),)
    return rows


def test_sample_is_small_and_well_formed(doc):
    assert os.path.getsize(SAMPLE) < 4 * 1024 * 1024
    assert doc["format"] == "dgl_crystalframer.megnet_sample/1"
    entries = doc["entries"]
    assert len(entries) == doc["n_entries"] > 6000
    ids = [e["id"] for e in entries]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(i.startswith("mp-") for i in ids)
    for e in entries[::50]:
        assert len(e["lattice"]) == 3 and all(len(r) == 3 for r in e["lattice"])
        assert len(e["species"]) == len(e["frac_coords"]) > 0
        assert set(e["targets"]) == set(TARGETS)
        assert any(v is not None for v in e["targets"].values())
        assert e["source"] in e["in_csvs"]
        for t in ("e_form", "gap_pbe"):  # membership exactly when the leaderboard has a value
            assert (e["split"][t] is None) == (e["targets"][t] is None)


def test_counts_match_readme(doc):
    readme = _readme_counts()
    assert set(readme) == set(TARGETS)
    for t in TARGETS:
        have = [e for e in doc["entries"] if e["targets"][t] is not None]
        total, n_train, n_val, n_test, protocol = readme[t]
        assert total == len(have), t
        if t in ("e_form", "gap_pbe"):
            assert "Leaderboard" in protocol
            got = tuple(sum(1 for e in have if e["split"][t] == s) for s in ("train", "val", "test"))
            assert got == (n_train, n_val, n_test), t
        else:  # paper protocol: n_train = int(0.8 n), n_val = n_test = int(0.1 n), the remainder unused
            assert (n_train, n_val, n_test) == (int(0.8 * total), int(0.1 * total), int(0.1 * total))
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    assert f"{doc['n_entries']} real Materials Project crystals" in text
    assert hashlib.sha256(open(SAMPLE, "rb").read()).hexdigest() in text


def test_sample_loads_as_structures(doc):
    """A few entries parse with pymatgen and their distances are physical."""
    import numpy as np
    from pymatgen.core import Lattice, Structure

    for e in doc["entries"][::700]:
        s = Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"])
        assert s.volume > 1.0
        if len(s) > 1:
            d = s.distance_matrix + np.eye(len(s)) * 100
            assert d.min() > 0.5


def _build_module():
    spec = importlib.util.spec_from_file_location("build_sample", os.path.join(ROOT, "scripts", "build_sample.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(os.environ.get("BUILD_SAMPLE_TEST") != "1", reason="set BUILD_SAMPLE_TEST=1 (downloads from PyPI)")
def test_rebuild_is_byte_identical(tmp_path):
    mod = _build_module()
    cache = os.environ.get("BUILD_SAMPLE_CACHE") or str(tmp_path / "dl")
    out = tmp_path / "out"
    assert mod.main(["--cache", cache, "--out-dir", str(out)]) == 0
    new_gz = (out / "megnet_sample.json.gz").read_bytes()
    old_gz = open(SAMPLE, "rb").read()
    assert hashlib.sha256(gzip.decompress(new_gz)).hexdigest() == hashlib.sha256(gzip.decompress(old_gz)).hexdigest(), \
        "the JSON payload differs from the committed sample"
    readme_zlib = re.search(r"used zlib ([0-9.]+)", open(README, encoding="utf-8").read()).group(1)
    if readme_zlib != zlib.ZLIB_RUNTIME_VERSION and new_gz != old_gz:
        pytest.skip(f"payload identical; gzip bytes differ because zlib {zlib.ZLIB_RUNTIME_VERSION} != {readme_zlib}")
    assert hashlib.sha256(new_gz).hexdigest() == hashlib.sha256(old_gz).hexdigest()
    assert (out / "README.md").read_text(encoding="utf-8") == open(README, encoding="utf-8").read()
