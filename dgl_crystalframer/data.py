"""Datasets: ``load_dataset(source, target)`` -> ``DatasetSplits(train, val, test, info)``.

Each split is a ``CrystalGraphDataset`` of ``(graph, target [1])`` items with ``.ids``, batched by
``batch.collate``.  The steps, each in its own module: the entries of the source
(``sources.py``), their target values (``targets.py``), split membership (``splits.py``), and
the graphs, built or read from the on-disk cache (``graph_cache.py``); for a jarvis-tools dataset,
an index beside the graphs lets the next load skip the source.  Entries with a missing target and
structures that cannot be used are skipped, counted in ``info`` and logged with their ids and
reasons.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .basis import default_cutoff
from .errors import DataError
from .graph_cache import build_graphs, cache_for, cache_of
from .graph_store import GraphList, num_atoms
from .sources import SPLITS, Entry, Source, jarvis_identity, open_source
from .splits import SPLIT_SEED, assign_splits
from .datasets import dataset_spec
from .targets import to_float

logger = logging.getLogger(__name__)

_LOG_EACH = 20  # structure failures logged one by one (WARNING); the rest go to INFO + a summary


class CrystalGraphDataset(torch.utils.data.Dataset):
    """Crystal graphs with one target each: items are ``(graph, target float32 [1])``.

    ``graphs``: DGLGraphs, or a ``graph_store.GraphList`` of graphs in the on-disk cache, read when
    an item is fetched (what ``load_dataset`` gives with a cache).
    """

    def __init__(self, graphs: Sequence[Any], targets: Any, ids: Sequence[str], target: str = "", unit: str = ""):
        arr = np.asarray(targets, dtype=np.float32)
        width = arr.shape[-1] if arr.ndim == 2 else 1
        targets = torch.as_tensor(arr.reshape(len(graphs), width) if len(graphs) else np.zeros((0, width), np.float32))
        if len(ids) != len(graphs):
            raise ValueError(f"{len(ids)} ids for {len(graphs)} graphs")
        if torch.isnan(targets).any():
            raise ValueError("targets contain NaN (entries with missing targets must be dropped before)")
        self.graphs = graphs if isinstance(graphs, GraphList) else GraphList(list(graphs))
        self.targets = targets
        self.ids = [str(i) for i in ids]
        self.target = target
        self.unit = unit

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int):
        return self.graphs[index], self.targets[index]

    def __repr__(self) -> str:
        return f"CrystalGraphDataset({len(self)} crystals, target={self.target!r} [{self.unit}])"


class DatasetSplits(NamedTuple):
    train: CrystalGraphDataset
    val: CrystalGraphDataset
    test: CrystalGraphDataset
    info: Dict[str, Any]


# ============================================================================================
# main entry


def load_dataset(
    source: str,
    target: Optional[str] = None,
    data_dir: Optional[str] = None,
    split: str = "auto",
    cutoff: Optional[float] = None,
    cache_dir: Optional[str] = None,
    seed: int = SPLIT_SEED,
    progress: bool = True,
    use_cache: bool = True,
    build_workers: Optional[int] = None,
) -> DatasetSplits:
    """Load ``source`` for ``target`` and split it; see the module docstring.

    split: "auto" | "paper" | "random" | "leaderboard" | "column" (``splits.py``).  cutoff: neighbour cutoff in Angstrom
    (None: ``basis.default_cutoff()``).  Entries with missing / non-finite targets and
    structures that fail are skipped, counted in ``info`` and logged.  ``build_workers``: processes
    that build missing graphs (None: the cores).  With the cache (``use_cache``), the splits hold
    references to the graphs on disk, read as batches need them.
    """
    cutoff = default_cutoff() if cutoff is None else float(cutoff)
    index = _index_file(source, target, data_dir, split, cutoff, cache_dir, seed) if use_cache else None
    if index is not None:
        found = _read_index(*index)
        if found is not None:
            return found
    src = open_source(source, data_dir)
    spec = dataset_spec(src.name)
    key, unit, tinfo = _target_key(src, source, target)
    warnings_said: List[str] = []  # the load's warnings, said again when the index serves the next load

    def warn(msg: str) -> None:
        warnings_said.append(msg)
        logger.warning("%s", msg)

    joint = list(tinfo.joint) if (tinfo is not None and key in tinfo.joint) else [key]

    # 1. usable targets (joint filter: the first three dft_3d targets / megnet e_form+gap share one split)
    usable: List[Tuple[Entry, float]] = []
    skipped: List[str] = []
    for e in src.entries:
        vals = [to_float(e.values.get(k)) for k in joint]
        if any(v is None for v in vals):
            skipped.append(e.id)
            continue
        usable.append((e, vals[joint.index(key)]))
    log_unit_note = _maybe_log10(src, key, tinfo, usable)
    if log_unit_note:
        usable = [(e, math.log10(v)) for e, v in usable if v > 0]
    if skipped:
        what = f"targets {joint}" if len(joint) > 1 else f"target {key!r}"
        # WARNING: shown by the command line without any logging set-up (Python's last-resort handler)
        warn(f"{src.label}: skipped {len(skipped)} of {len(src.entries)} entries whose {what} is missing, NaN, inf, "
             f"'na' or not a number (first: {', '.join(skipped[:5])})")
        for sid in skipped:
            logger.debug("%s: skipped %s: missing or non-finite target", src.label, sid)
    if not usable:
        raise DataError(f"{src.label}: no entries with a usable value of target {key!r} "
                         f"({len(src.entries)} entries, {len(skipped)} with missing/non-finite targets)")

    # 2. split membership
    protocol, assignment = assign_splits(src, key, tinfo, [e for e, _ in usable], split, seed)

    # 3. graphs
    chosen = [(e, y, s) for (e, y), s in zip(usable, assignment) if s is not None]
    cache = cache_for(src, cutoff, cache_dir) if use_cache else None
    graphs, failed_all, stats = build_graphs([e for e, _, _ in chosen], cutoff, cache, progress, src.label, build_workers)
    failed = {e.id: failed_all[e.id] for e, _, _ in chosen if e.id in failed_all}
    if failed:
        for k, (fid, reason) in enumerate(failed.items()):
            logger.log(logging.WARNING if k < _LOG_EACH else logging.INFO, "%s: skipped structure %s: %s", src.label, fid, reason)
        warn(f"{src.label}: skipped {len(failed)} structure(s) that could not be turned into graphs (ids and reasons in "
             "info['failed'])")

    parts: Dict[str, Tuple[List[Any], List[float], List[str]]] = {s: ([], [], []) for s in SPLITS}
    max_atoms = spec.train_max_atoms if spec is not None else None  # the reference recipe's training filter
    too_large = []
    for e, y, s in chosen:
        if s == "train" and max_atoms is not None and e.id in graphs and num_atoms(graphs[e.id]) > max_atoms:
            too_large.append(e.id)
            continue
        if e.id in graphs and e.id not in failed:
            parts[s][0].append(graphs[e.id])
            parts[s][1].append(y)
            parts[s][2].append(e.id)
    datasets = {s: CrystalGraphDataset(g, np.asarray(y, dtype=np.float32).reshape(-1, 1), i, key, unit) for s, (g, y, i) in parts.items()}
    n_used = sum(len(d) for d in datasets.values())
    if n_used == 0:
        raise DataError(f"{src.label}: zero usable entries for target {key!r} ({len(skipped)} missing targets, "
                        f"{len(failed)} failed structures)")
    info = {
        "source": source if spec is not None else src.name,
        "path": src.extra.get("path") or (None if spec is not None else os.path.abspath(os.path.expanduser(str(source)))),
        "target": key,
        "unit": unit,
        "split": protocol,
        "seed": seed,
        "cutoff": cutoff,
        "sizes": {s: len(d) for s, d in datasets.items()},
        "n_entries": len(src.entries),
        "n_skipped_target": len(skipped),
        "skipped_ids": skipped,
        "n_failed": len(failed),
        "failed": failed,
        "n_unassigned": sum(1 for s in assignment if s is None),
        "n_train_too_large": len(too_large),
        "cache": cache.folder if cache is not None else None,
        **stats,
    }
    if log_unit_note:
        info["note"] = log_unit_note
    if too_large:
        warn(f"{src.label}: {len(too_large)} training crystals with more than {max_atoms} atoms left out, as the "
             f"reference recipe does (first: {', '.join(too_large[:5])})")
    logger.info("%s/%s: %d train / %d val / %d test (%s split); %d skipped (target), %d failed structures; "
                "%d graphs built in %.1f s, %d from cache",
                src.label, key, info["sizes"]["train"], info["sizes"]["val"], info["sizes"]["test"], protocol,
                len(skipped), len(failed), stats["n_built"], stats["build_seconds"], stats["n_from_cache"])
    if index is not None and cache is not None:
        _write_index(index[1], datasets, info, warnings_said)
    return DatasetSplits(datasets["train"], datasets["val"], datasets["test"], info)


# ============================================================================================
# the index: a named dataset's split, targets and graph references, kept beside its graphs so that
# the next load need not parse the source (jarvis-tools reads its whole JSON: GBs for OQMD)

_BUILD_STATS = ("n_built", "n_from_cache", "build_seconds", "cache")


def _index_file(source: str, target: Optional[str], data_dir: Optional[str], split: str, cutoff: float,
                cache_dir: Optional[str], seed: int) -> Optional[Tuple[Any, str]]:
    """(graph cache, index path) of a jarvis-tools dataset whose file is present, else None."""
    spec = dataset_spec(source)
    if spec is None or spec.jarvis is None:
        return None  # the sample and a user's files are small: read as they are
    identity = jarvis_identity(spec, data_dir)
    if identity is None:
        return None
    from . import __version__

    try:
        leaderboard = importlib.metadata.version("jarvis-leaderboard")
    except importlib.metadata.PackageNotFoundError:
        leaderboard = None
    what = {"target": spec.resolve_target(spec.default_target if target is None else target), "split": split,
            "seed": seed, "version": __version__, "jarvis_leaderboard": leaderboard, "spec": repr(spec)}
    cache = cache_of(spec.name, identity, cutoff, cache_dir)
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    return cache, os.path.join(cache.folder, f"index-{key}.json")


def _write_index(path: str, datasets: Dict[str, CrystalGraphDataset], info: Dict[str, Any], said: List[str]) -> None:
    doc = {"parts": {s: {"ids": d.ids, "y": d.targets[:, 0].tolist()} for s, d in datasets.items()},
           "info": {k: v for k, v in info.items() if k not in _BUILD_STATS}, "warnings": said}
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)
    except (OSError, TypeError, ValueError) as exc:  # an unwritable cache: the next load reads the source again
        logger.info("index not written (%s)", exc)


def _read_index(cache: Any, path: str) -> Optional[DatasetSplits]:
    """The splits an index describes, if it and every graph it names are in the cache; else None."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
        parts, info = doc["parts"], dict(doc["info"])
        ids = [i for s in SPLITS for i in parts[s]["ids"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    refs, _ = cache.load(set(ids))
    if any(i not in refs for i in ids):
        return None
    for msg in doc.get("warnings", []):
        logger.warning("%s", msg)
    info.update(n_built=0, n_from_cache=len(ids), build_seconds=0.0, cache=cache.folder, index=path)
    logger.info("%s/%s: splits and graphs from the cache index %s (the source was not read again)",
                info.get("source"), info.get("target"), path)
    datasets = {s: CrystalGraphDataset(GraphList([refs[i] for i in parts[s]["ids"]]),
                                       np.asarray(parts[s]["y"], dtype=np.float32).reshape(-1, 1), parts[s]["ids"],
                                       info["target"], info["unit"]) for s in SPLITS}
    return DatasetSplits(datasets["train"], datasets["val"], datasets["test"], info)


def _target_key(src: Source, source: str, target: Optional[str]):
    spec = dataset_spec(src.name)
    if spec is not None:
        key = spec.resolve_target(spec.default_target if target is None else target)
        t = spec.targets[key]
        return key, t.unit, t
    # user data
    if target is None:
        cands = src.target_keys
        if src.name == "folder":
            return "target", "", None
        numeric = [c for c in cands if any(to_float(e.values.get(c)) is not None for e in src.entries[:50])]
        if len(numeric) != 1:
            raise DataError(f"{src.label}: choose a target among {numeric or cands}")
        return numeric[0], "", None
    target = str(target)
    if src.name == "folder" and target not in src.target_keys:
        if len(src.target_keys) == 2:  # one value column: any name means it
            return "target", "", None
        raise DataError(f"{src.label}: id_prop.csv targets are 'target' (first value column) or column indices {src.target_keys[1:]}")
    if src.name != "folder" and src.entries and not any(target in e.values for e in src.entries[:1000]):
        raise DataError(f"{src.label}: no target column/key {target!r}; available: {src.target_keys}")
    return target, "", None


def _maybe_log10(src: Source, key: str, tinfo, usable: List[Tuple[Entry, float]]) -> Optional[str]:
    """Targets marked ``log10_if_gpa`` (jarvis "megnet" moduli): take log10 if the file holds GPa rather than log10(GPa)."""
    if tinfo is None or not tinfo.log10_if_gpa or not usable:
        return None
    median = float(np.median([y for _, y in usable]))
    if median > 10.0:  # log10 of realistic moduli is < 3; a median above 10 can only be GPa
        note = f"'{key}' values look like GPa (median {median:.3g}); using log10 of the positive ones"
        logger.info("%s: %s", src.label, note)
        return note
    return None


__all__ = ["CrystalGraphDataset", "DatasetSplits", "load_dataset"]
