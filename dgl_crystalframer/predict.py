"""Checkpoint -> predictions for crystal structures (the ``predict`` command is cli/predict.py).

    predictor = Predictor("runs/x/model.pt")
    ids, values, errors = predictor.predict_files(["a.cif", "folder/"])   # values in the target's units
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import sparse
from ._dgl import dgl
from .batch import to_device
from .checkpoint import load_checkpoint
from .graph import build_graph
from .targets import Normalizer

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
        self.device = sparse.resolve_device(device)
        self.backend = sparse.select_backend(self.device, sparse.backend_from_env(backend))
        self.model, self.meta = load_checkpoint(checkpoint, device=self.device)
        self.model.sparse_backend = self.backend
        self.batch_size = int(batch_size)
        self.normalizer = Normalizer.from_dict(self.meta["normalizer"])
        self.cutoff = self.meta.get("cutoff")
        self.target = self.meta.get("target") or "prediction"
        self.unit = self.meta.get("unit") or ""

    @torch.no_grad()
    def predict_graphs(self, graphs: Sequence[Any]) -> np.ndarray:
        """Predictions (original units) for graphs from ``build_graph``, in batches."""
        self.model.eval()
        out: List[torch.Tensor] = []
        for i in range(0, len(graphs), self.batch_size):
            bg = to_device(dgl.batch(list(graphs[i:i + self.batch_size])), self.device, non_blocking=True,
                           backend=self.backend)
            out.append(self.model(bg).reshape(-1).double())  # kept on the device: one copy back, at the end
        return self.normalizer.decode(torch.cat(out).cpu().numpy()) if out else np.zeros(0)

    def graphs_for(self, structures: Iterable[Any], ids: Optional[Sequence[str]] = None):
        """Build graphs; returns ``(ids, graphs, errors)`` with one ``(id, message)`` per failure."""
        ok_ids, graphs, errors = [], [], []
        for k, s in enumerate(structures):
            name = str(ids[k]) if ids is not None else (str(s) if isinstance(s, (str, os.PathLike)) else str(k))
            try:
                graphs.append(build_graph(s, cutoff=self.cutoff, entry_id=name))
                ok_ids.append(name)
            except Exception as exc:  # StructureError and whatever a file reader raises
                errors.append((name, error_line(exc)))
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


def error_line(exc: Exception) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["Predictor", "STRUCTURE_SUFFIXES", "error_line", "expand_inputs"]
