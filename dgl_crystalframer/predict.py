"""Checkpoint -> predictions for crystal structure files.

    python -m dgl_crystalframer predict --checkpoint runs/x/swa.pt a.cif b.vasp some_folder/ [--out preds.csv]

prints ``id,<target> (<unit>)`` then one line per structure (values in the target's original
units) on stdout; a structure that cannot be read or used gets one ``error: ...`` line on stderr
and the others are still predicted.  The exit status is non-zero only when nothing was predicted.

From Python::

    predictor = Predictor("runs/x/swa.pt")
    ids, values, errors = predictor.predict_files(["a.cif", "folder/"])
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import sparse
from ._dgl import dgl, resolve_device
from .batch import to_device

# Folder entries that are read as structures (files named on the command line are always tried).
STRUCTURE_SUFFIXES = {".cif", ".mcif", ".vasp", ".poscar", ".json", ".xsf", ".cssr"}
STRUCTURE_PREFIXES = ("poscar", "contcar")


def expand_inputs(inputs: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files to read: each file as given, each folder's structure files (sorted, not recursive).

    Returns ``(files, errors)`` with ``errors`` as ``(input, message)`` for missing paths and
    folders without structure files.
    """
    files: List[str] = []
    errors: List[Tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(c) for c in p.iterdir() if c.is_file() and (
                c.suffix.lower() in STRUCTURE_SUFFIXES or c.name.lower().startswith(STRUCTURE_PREFIXES)))
            if not found:
                errors.append((item, f"folder has no structure files ({', '.join(sorted(STRUCTURE_SUFFIXES))}, POSCAR*, CONTCAR*)"))
            files.extend(found)
        elif p.is_file():
            files.append(item)
        else:
            errors.append((item, "no such file or folder"))
    return files, errors


class Predictor:
    """A trained model from a checkpoint of :mod:`dgl_crystalframer.training`, ready to predict."""

    def __init__(self, checkpoint: str, device: str = "auto", batch_size: int = 64, backend: Optional[str] = None):
        from .training import load_checkpoint

        self.device = resolve_device(device)
        if backend is not None:
            sparse.set_backend(backend)
        self.backend = sparse.select_backend(self.device)
        self.model, self.meta = load_checkpoint(checkpoint, device=self.device)
        self.batch_size = int(batch_size)
        norm = self.meta["normalizer"]
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        self.cutoff = self.meta.get("cutoff")
        self.target = self.meta.get("target") or "prediction"
        self.unit = self.meta.get("unit") or ""

    @torch.no_grad()
    def predict_graphs(self, graphs: Sequence[Any]) -> np.ndarray:
        """Predictions (original units) for graphs from ``build_graph``, in batches."""
        self.model.eval()
        out: List[np.ndarray] = []
        for i in range(0, len(graphs), self.batch_size):
            bg = to_device(dgl.batch(list(graphs[i:i + self.batch_size])), self.device)
            y = self.model(bg).reshape(-1).double().cpu().numpy()
            out.append(y * self.std + self.mean)
        return np.concatenate(out) if out else np.zeros(0)

    def graphs_for(self, structures: Iterable[Any], ids: Optional[Sequence[str]] = None):
        """Build graphs; returns ``(ids, graphs, errors)`` with one ``(id, message)`` per failure."""
        from .graph import build_graph

        ok_ids, graphs, errors = [], [], []
        for k, s in enumerate(structures):
            name = str(ids[k]) if ids is not None else (str(s) if isinstance(s, (str, os.PathLike)) else str(k))
            try:
                graphs.append(build_graph(s, cutoff=self.cutoff, entry_id=name))
                ok_ids.append(name)
            except Exception as exc:  # StructureError and whatever a file reader raises
                errors.append((name, _message(exc)))
        return ok_ids, graphs, errors

    def predict_structures(self, structures: Sequence[Any], ids: Optional[Sequence[str]] = None):
        """Structures (pymatgen/ASE/jarvis objects or file paths) -> ``(ids, values, errors)``."""
        ok_ids, graphs, errors = self.graphs_for(structures, ids)
        return ok_ids, self.predict_graphs(graphs), errors

    def predict_files(self, inputs: Sequence[str]):
        """Files and folders -> ``(ids, values, errors)``; ids are the paths."""
        files, errors = expand_inputs(inputs)
        ids, values, more = self.predict_structures(files)
        return ids, values, errors + more


def _message(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER",
                   help="structure files (CIF, POSCAR/CONTCAR/.vasp, pymatgen JSON, ...) and/or folders of them")
    p.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by training (swa.pt, best.pt or last.pt)")
    p.add_argument("--out", "-o", help="also write the predictions to this CSV file")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--backend", choices=("auto", "dgl", "torch"), default=None,
                   help="sparse operations: DGL's kernels or plain PyTorch (default: auto)")
    p.add_argument("--batch-size", type=int, default=64, help="crystals per inference batch (default 64)")


def run(args: argparse.Namespace) -> int:
    try:
        predictor = Predictor(args.checkpoint, device=args.device, batch_size=args.batch_size, backend=args.backend)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids, values, errors = predictor.predict_files(args.inputs)
    for name, msg in errors:
        print(f"error: {name}: {msg}" if not msg.startswith(str(name)) else f"error: {msg}", file=sys.stderr)
    header = ["id", f"{predictor.target} ({predictor.unit})" if predictor.unit else predictor.target]
    rows = [header] + [[name, f"{v:.6g}"] for name, v in zip(ids, values)]
    csv.writer(sys.stdout, lineterminator="\n").writerows(rows)
    sys.stdout.flush()
    if args.out:
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    if not ids:
        print("error: nothing could be predicted", file=sys.stderr)
        return 1
    if errors:
        print(f"{len(ids)} predicted, {len(errors)} failed", file=sys.stderr)
    return 0


__all__ = ["Predictor", "expand_inputs", "add_arguments", "run", "STRUCTURE_SUFFIXES"]
