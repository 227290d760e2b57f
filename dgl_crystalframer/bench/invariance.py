"""The largest invariance error of each frame type on real crystals of the embedded sample.

    dgl-crystalframer invariance [--n 40] [--frames none,max,...]   (also python -m benchmarks.invariance)

For each frame type, a default-size model (random weights, sigma normaliser recorded on a
training batch) predicts each crystal as given and after: a random rotation + translation, a
random atom order, a 2x1x1 and a 1x2x2 supercell, and atoms moved out of the cell by whole
lattice vectors.  Printed: the largest relative change of the prediction per transformation
(|dy| / max(|y|, 1e-3)).  ``pca`` is expected to fail the cell-choice columns (the paper's
non-invariant baseline); tests/test_model.py asserts the same with a 1e-4 tolerance.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch
from pymatgen.core import Lattice, Structure
from scipy.spatial.transform import Rotation

from .. import sparse
from .._dgl import dgl
from ..graph import build_graph
from ..model import CrystalFramer
from ..sources import SAMPLE_PATH

FRAMES = ("none", "max", "weighted_pca", "static_local", "lattice", "pca")  # pca last: it is expected to fail


def transforms(s: Structure, rng: np.random.Generator):
    rot = Rotation.random(random_state=int(rng.integers(1 << 31))).as_matrix()
    order = rng.permutation(len(s))
    return {
        "rotation+translation": Structure(Lattice(s.lattice.matrix @ rot.T), s.species,
                                          s.cart_coords @ rot.T + rng.normal(size=3), coords_are_cartesian=True),
        "atom order": Structure(s.lattice, [s.species[i] for i in order], s.frac_coords[order]),
        "2x1x1 supercell": s.copy().make_supercell([2, 1, 1]),
        "1x2x2 supercell": s.copy().make_supercell([1, 2, 2]),
        "unwrapped atoms": Structure(s.lattice, s.species, s.frac_coords + rng.integers(-2, 3, size=(len(s), 3))),
    }


def build_parser(prog: str = "dgl-crystalframer invariance") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="crystals (the smallest cells of the sample come first)")
    p.add_argument("--frames", default=",".join(FRAMES), help="comma-separated frame types (default: all)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--backend", choices=("auto", "dgl", "torch"), default="auto", help="sparse backend (default: auto)")
    return p


def main(argv=None, prog: str = "dgl-crystalframer invariance") -> int:
    p = build_parser(prog)
    args = p.parse_args(argv)
    frames = [f.strip() for f in args.frames.split(",") if f.strip()]
    unknown = [f for f in frames if f not in FRAMES]
    if unknown:
        p.error(f"unknown frame type(s) {unknown}; choose from {', '.join(FRAMES)}")
    device = sparse.resolve_device(args.device)
    backend = sparse.select_backend(device, sparse.backend_from_env(args.backend))
    entries = json.loads(gzip.decompress(Path(SAMPLE_PATH).read_bytes()))["entries"]
    picked = sorted((e for e in entries if all(isinstance(x, str) for x in e["species"])), key=lambda e: len(e["species"]))
    structures = [Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"]) for e in picked[::97][: args.n]]
    rng = np.random.default_rng(0)
    variants = [transforms(s, rng) for s in structures]
    names = list(variants[0])
    print(f"{len(structures)} crystals ({min(len(s) for s in structures)}-{max(len(s) for s in structures)} atoms); "
          "largest relative change of the prediction")
    print(f"{'frame':14s}" + "".join(f"{n:>22s}" for n in names))
    base = dgl.batch([build_graph(s) for s in structures])
    transformed = {name: dgl.batch([build_graph(v[name]) for v in variants]) for name in names}  # once, for all frames
    for frame in frames:
        torch.manual_seed(0)
        model = CrystalFramer(frame=frame).to(device)
        model.sparse_backend = backend
        model.train()
        model(base)  # records the sigma normaliser
        model.eval()
        with torch.no_grad():
            y = model(base)
            row = []
            for name in names:
                y2 = model(transformed[name])
                row.append(float(((y2 - y).abs() / y.abs().clamp_min(1e-3)).max()))
        print(f"{frame:14s}" + "".join(f"{v:22.1e}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
