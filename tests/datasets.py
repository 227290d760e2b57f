"""Shared test helpers (not a test file): small real-crystal datasets written to disk, tiny training
configurations, the shared JARVIS sample.  Imported as ``from datasets import ...`` (pytest puts tests/
on sys.path; subprocess scripts insert it themselves).  Fixtures are in conftest.py."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "dgl_crystalframer" / "sample" / "megnet_sample.json.gz"
TINY = dict(num_layers=1, dim=32, num_heads=4, ffn_dim=64, num_angle_basis=8)

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "jarvis_dft3d_2021_sample")
SHARED = os.path.abspath(SHARED)
if not os.path.isdir(SHARED):
    SHARED = "/work/shared/data/jarvis_dft3d_2021_sample"
HAVE_SHARED = os.path.isfile(os.path.join(SHARED, "jdft_3d-8-18-2021.json.zip"))


# ------------------------------------------------------------------------------------ training runs


def write_small_dataset(path: Path, n_train: int = 40, n_val: int = 12, n_test: int = 12, max_atoms: int = 6) -> Path:
    """A JSON dataset (jarvis-style records with a 'split' field) of small real MP crystals, target e_form."""
    doc = json.loads(gzip.decompress(SAMPLE.read_bytes()))
    want = {"train": n_train, "val": n_val, "test": n_test}
    records = []
    for e in doc["entries"]:
        split = (e.get("split") or {}).get("e_form")
        value = e["targets"].get("e_form")
        if split not in want or want[split] == 0 or value is None or len(e["species"]) > max_atoms:
            continue
        if not all(isinstance(s, str) for s in e["species"]):
            continue
        want[split] -= 1
        records.append({"id": e["id"], "atoms": {"lattice_mat": e["lattice"], "coords": e["frac_coords"],
                                                 "elements": e["species"], "cartesian": False},
                        "e_form": value, "split": split})
    path.write_text(json.dumps(records))
    return path


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(data), target="e_form", frame="max", preset="smoke", epochs=3, batch_size=8,
                max_train=None, max_eval=None, cache_dir=str(out.parent / "cache"), out_dir=str(out), progress=False,
                plots=False, threads=1, **TINY)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------- data sources


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


def _write_csv(tmp_path, entries, name="c.csv"):
    import pandas as pd

    rows = [{"id": e["id"], "structure": _structure(e).to(fmt="cif"), "y": e["targets"]["e_form"]} for e in entries]
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return str(tmp_path / name)
