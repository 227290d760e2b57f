"""Checkpoint(s) -> predictions for crystal structures (the ``predict`` command is cli/predict.py).

    predictor = Predictor("runs/x/model.pt")                   # or a list of checkpoints: an ensemble
    ids, values, errors = predictor.predict_files(["a.cif", "folder/", "my_data.csv"])   # target's units
    result = predictor.predict(["my_data.csv"])                # + std, training-domain flags, given targets

Inputs are structure files, folders of them, and datasets in the formats training takes
(``sources.open_source``: a CSV, a folder with ``id_prop.csv``, a JSON list of records), whose ids
are kept.  An ensemble's members must agree on target, unit and graph cutoff; each graph is built
once and every member predicts it: the mean is the prediction, the standard deviation over the
members (ddof 1) a measure of its uncertainty.  Each crystal is checked against the training
domain its checkpoints record (``domain.py``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import sparse
from ._dgl import dgl
from .batch import to_device
from .checkpoint import load_checkpoint
from .domain import outside_any
from .errors import ConfigError, DataError
from .graph import build_graph
from .sources import open_source, unique_ids
from .targets import Normalizer, to_float

# Folder entries that are read as structures (files named on the command line are always tried).
STRUCTURE_SUFFIXES = {".cif", ".mcif", ".vasp", ".poscar", ".json", ".xsf", ".cssr"}
STRUCTURE_PREFIXES = ("poscar", "contcar")
# what an ensemble's members must share, with how the message names it
SHARED_META = {"target": "target", "unit": "unit", "cutoff": "graph cutoff"}


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


def is_dataset(path: str) -> bool:
    """A dataset in a format training takes (rather than one structure file or a folder of them):
    a CSV, a folder with ``id_prop.csv``, a JSON list of records (or ``{"entries": [...]}``, zipped
    or gzipped); a JSON object is a pymatgen structure."""
    p = Path(path)
    if p.is_dir():
        return (p / "id_prop.csv").is_file()
    low = p.name.lower()
    if not p.is_file():
        return False
    if low.endswith((".csv", ".zip", ".json.gz")):
        return True
    if low.endswith(".json"):
        with open(p, "r", encoding="utf-8", errors="replace") as fh:
            head = fh.read(4096).lstrip()
        if head.startswith("["):
            return True
        try:
            doc = json.loads(p.read_text(encoding="utf-8")) if head.startswith("{") and '"entries"' in head else None
        except ValueError:
            return False
        return isinstance(doc, dict) and isinstance(doc.get("entries"), list)
    return False


@dataclass
class Predictions:
    """What :meth:`Predictor.predict` returns, one row per predicted crystal.

    ids:    entry ids (a dataset's own ids; file paths for structure files)
    values: predictions in the target's units (the mean over an ensemble's members)
    std:    standard deviation over the members (ddof 1), or None for one checkpoint
    domain: "" inside the training domain, else why not (``domain.outside``); None where the
            checkpoints record no domain (written by an older version, or converted)
    given:  the inputs' own target values (NaN where an entry has none), or None without any
    errors: ``(input or id, message)`` of everything that could not be predicted
    """

    ids: List[str]
    values: np.ndarray
    std: Optional[np.ndarray]
    domain: List[Optional[str]]
    given: Optional[np.ndarray]
    errors: List[Tuple[str, str]]

    @property
    def n_outside(self) -> int:
        return sum(1 for d in self.domain if d)

    @property
    def domain_known(self) -> bool:
        return any(d is not None for d in self.domain)

    def mae(self) -> Tuple[Optional[float], int]:
        """Mean absolute error against the given targets, and how many crystals had one."""
        if self.given is None:
            return None, 0
        ok = np.isfinite(self.given)
        return (float(np.mean(np.abs(self.values[ok] - self.given[ok]))) if ok.any() else None), int(ok.sum())


class Predictor:
    """Trained models from checkpoints of :mod:`dgl_crystalframer.training` or official CrystalFramer
    ``.ckpt`` files, ready to predict.

    ``checkpoint``: one path, or several (an ensemble).  ``load_options`` go to ``load_checkpoint``
    (``weights``, ``overrides``).
    """

    def __init__(self, checkpoint: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], device: str = "auto",
                 batch_size: int = 64, backend: Optional[str] = None, **load_options: Any):
        self.device = sparse.resolve_device(device)
        self.backend = sparse.select_backend(self.device, sparse.backend_from_env(backend))
        paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        if not paths:
            raise ConfigError("no checkpoint given")
        self.checkpoints = [str(p) for p in paths]
        loaded = [load_checkpoint(p, device=self.device, **load_options) for p in self.checkpoints]
        self.models = [model for model, _ in loaded]
        for model in self.models:
            model.sparse_backend = self.backend
        self.metas = [meta for _, meta in loaded]
        _check_members_agree(self.checkpoints, self.metas)
        self.model, self.meta = self.models[0], self.metas[0]
        self.normalizers = [Normalizer.from_dict(m["normalizer"]) for m in self.metas]
        self.normalizer = self.normalizers[0]
        self.batch_size = int(batch_size)
        self.cutoff = self.meta.get("cutoff")
        self.target = self.meta.get("target") or "prediction"
        self.unit = self.meta.get("unit") or ""
        self.domains = [m.get("domain") for m in self.metas]

    @property
    def ensemble(self) -> bool:
        return len(self.models) > 1

    @torch.no_grad()
    def predict_members(self, graphs: Sequence[Any]) -> np.ndarray:
        """Predictions [members, crystals] (original units) for graphs from ``build_graph``, in batches."""
        out: List[List[torch.Tensor]] = [[] for _ in self.models]
        for i in range(0, len(graphs), self.batch_size):
            bg = to_device(dgl.batch(list(graphs[i:i + self.batch_size])), self.device, non_blocking=True,
                           backend=self.backend)
            for k, model in enumerate(self.models):
                model.eval()
                out[k].append(model(bg).reshape(-1).double())  # kept on the device: one copy back, at the end
        if not len(graphs):
            return np.zeros((len(self.models), 0))
        return np.stack([n.decode(torch.cat(o).cpu().numpy()) for n, o in zip(self.normalizers, out)])

    def predict_graphs(self, graphs: Sequence[Any]) -> np.ndarray:
        """Predictions (original units; an ensemble's mean) for graphs from ``build_graph``."""
        return self.predict_members(graphs).mean(axis=0) if len(graphs) else np.zeros(0)

    def graphs_for(self, structures: Iterable[Any], ids: Optional[Sequence[str]] = None):
        """Build graphs; returns ``(ids, graphs, errors)`` with one ``(id, message)`` per failure.
        A structure may also be a callable that returns one (a dataset entry's reader)."""
        ok_ids, graphs, errors = [], [], []
        for k, s in enumerate(structures):
            name = str(ids[k]) if ids is not None else (str(s) if isinstance(s, (str, os.PathLike)) else str(k))
            try:
                graphs.append(build_graph(s() if callable(s) else s, cutoff=self.cutoff, entry_id=name))
                ok_ids.append(name)
            except Exception as exc:  # StructureError and whatever a file reader raises
                errors.append((name, error_line(exc)))
        return ok_ids, graphs, errors

    def predict_structures(self, structures: Sequence[Any], ids: Optional[Sequence[str]] = None):
        """Structures (pymatgen/ASE/jarvis objects or file paths) -> ``(ids, values, errors)``."""
        ok_ids, graphs, errors = self.graphs_for(structures, ids)
        return ok_ids, self.predict_graphs(graphs), errors

    def predict_files(self, inputs: Sequence[str]):
        """Files, folders and datasets -> ``(ids, values, errors)``; ids are the paths of structure
        files and the entry ids of datasets."""
        r = self.predict(inputs)
        return r.ids, r.values, r.errors

    def predict(self, inputs: Sequence[str], target: Optional[str] = None) -> Predictions:
        """Structure files, folders of them and datasets -> :class:`Predictions`.  ``target``: the
        datasets' column to compare with (default: the checkpoint's target, ``target`` for an
        ``id_prop.csv`` folder); naming one that a dataset lacks is a ``DataError``."""
        structures, ids, given, errors = self._entries(inputs, target)
        ok_ids, graphs, failed = self.graphs_for(structures, ids)
        members = self.predict_members(graphs)
        keep = {name: k for k, name in enumerate(ids)}
        values = members.mean(axis=0) if len(graphs) else np.zeros(0)
        std = members.std(axis=0, ddof=1) if self.ensemble and len(graphs) else None
        known = [given[keep[name]] for name in ok_ids]
        has_given = any(not math.isnan(v) for v in given)
        return Predictions(ok_ids, values, std, [outside_any(self.domains, g) for g in graphs],
                           np.asarray(known, dtype=np.float64) if has_given else None, errors + failed)

    def _entries(self, inputs: Sequence[str], target: Optional[str]):
        """(structures or readers, ids, given target values (NaN: none), errors) of all inputs."""
        structures: List[Any] = []
        ids: List[str] = []
        given: List[float] = []
        plain: List[str] = []
        for item in inputs:
            if not is_dataset(item):
                plain.append(item)
                continue
            src = open_source(item)
            key = target or ("target" if src.name == "folder" else self.meta.get("target"))
            if target is not None and not any(target in e.values for e in src.entries):
                raise DataError(f"{item}: no target column/key {target!r}; available: {src.target_keys}")
            for e in src.entries:
                structures.append(e.make)
                ids.append(e.id)
                v = to_float(e.values.get(key)) if key else None
                given.append(math.nan if v is None else v)
        files, errors = expand_inputs(plain)
        structures += files
        ids += files
        given += [math.nan] * len(files)
        ids = unique_ids(ids)[0]  # several inputs may share ids: keep every row, each id once
        return structures, ids, given, errors


def _check_members_agree(paths: Sequence[str], metas: Sequence[dict]) -> None:
    """An ensemble averages numbers of one quantity, on one graph: stop with one line otherwise."""
    first = metas[0]
    for path, meta in zip(paths[1:], metas[1:]):
        for key, what in SHARED_META.items():
            a, b = first.get(key), meta.get(key)
            same = (a is None and b is None) if (a is None or b is None) else (
                math.isclose(float(a), float(b), rel_tol=1e-9) if key == "cutoff" else a == b)
            if not same:
                raise ConfigError(f"ensemble members disagree on the {what}: {paths[0]} has {a!r}, {path} has {b!r}; "
                                  "an ensemble needs checkpoints of one target, unit and graph cutoff")


def error_line(exc: Exception) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["Predictions", "Predictor", "STRUCTURE_SUFFIXES", "error_line", "expand_inputs", "is_dataset"]
