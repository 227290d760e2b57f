"""Import the package before anything loads torch, so that the tests run with the OpenMP wait
policy that users get (dgl_crystalframer/_openmp.py)."""
import dgl_crystalframer  # noqa: F401

import gzip
import json

import pytest

from dgl_crystalframer import sparse
from dgl_crystalframer.sources import SAMPLE_PATH


@pytest.fixture
def backend(monkeypatch):
    """Run with ``$DGL_CRYSTALFRAMER_BACKEND`` set (what the entry points read), and unset after."""
    def use(name):
        monkeypatch.setenv(sparse.BACKEND_ENV, name)
    monkeypatch.delenv(sparse.BACKEND_ENV, raising=False)
    yield use


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
