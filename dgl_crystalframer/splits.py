"""Train / validation / test membership (docs/METHOD.md 6).

Protocols (``split=``):

* ``paper``: the reference code's random split: ``random.seed(seed)``, ``random.shuffle`` of the
  index list, n_train = int(0.8 n), n_val = n_test = int(0.1 n), train = the first n_train,
  val = ``ids[-(n_val + n_test):-n_test]``, test = the last n_test; the one or two entries left
  between train and val are unused, as there (44,578 / 5,572 / 5,572 of the 55,723 JARVIS
  formation energies).  A target with fixed sizes in its dataset's spec (jarvis "megnet" e_form and
  gap: 60,000 / 5,000 / 4,239) uses those instead.
* ``random``: the same shuffle, 80/10/10 with every entry used (train takes the remainder); the
  default for a user's data without a split column.
* ``leaderboard``: the JARVIS-Leaderboard membership (the installed ``jarvis_leaderboard``
  package, or the records' ``leaderboard_split`` field).
* ``column``: a ``split`` column of a user's CSV/JSON.  With train and test only (matbench-style
  data), a validation set is carved from train: ``VAL_FRACTION`` of it, seeded, logged.
* ``auto``: leaderboard for a dataset whose file carries one per target (the embedded sample's
  e_form/gap), column when the data has one, paper for the named datasets, random for a user's data.
"""
from __future__ import annotations

import logging
import random
from typing import List, Optional, Sequence, Tuple

from .errors import DataError
from .sources import SPLITS, Entry, Source, leaderboard_membership, norm_split
from .datasets import TargetInfo, dataset_spec

logger = logging.getLogger(__name__)

SPLIT_SEED = 123
PROTOCOLS = ("auto", "paper", "random", "leaderboard", "column")
VAL_FRACTION = 0.1  # of train, when the data has train and test but no validation entries


def paper_split_sizes(n: int, fixed: Optional[Tuple[int, int, int]] = None) -> Tuple[int, int, int]:
    """(n_train, n_val, n_test) of the reference code: int(0.8 n), int(0.1 n), int(0.1 n)."""
    if fixed is not None:
        if sum(fixed) > n:
            raise DataError(f"split sizes {fixed} need {sum(fixed)} entries, only {n} usable")
        return fixed
    return int(0.8 * n), int(0.1 * n), int(0.1 * n)


def random_split_sizes(n: int) -> Tuple[int, int, int]:
    """80/10/10 with every entry used: n_val = n_test = int(0.1 n), train the rest."""
    n_val = n_test = int(0.1 * n)
    return n - n_val - n_test, n_val, n_test


def paper_split(n: int, seed: int = SPLIT_SEED, sizes: Optional[Tuple[int, int, int]] = None
                ) -> Tuple[List[int], List[int], List[int]]:
    """Index lists (train, val, test) exactly as the reference: random.seed + random.shuffle."""
    n_train, n_val, n_test = sizes if sizes is not None else paper_split_sizes(n)
    ids = list(range(n))
    random.seed(seed)
    random.shuffle(ids)
    train = ids[:n_train]
    val = ids[-(n_val + n_test):-n_test] if n_test > 0 else ids[len(ids) - n_val:] if n_val else []
    test = ids[-n_test:] if n_test > 0 else []
    return train, val, test


def _labels(n: int, parts) -> List[Optional[str]]:
    labels: List[Optional[str]] = [None] * n
    for name, idx in zip(SPLITS, parts):
        for i in idx:
            labels[i] = name
    return labels


def carve_validation(labels: List[Optional[str]], seed: int, label: str) -> List[Optional[str]]:
    """Move a seeded random VAL_FRACTION (at least one) of the train entries to val."""
    train = [i for i, lb in enumerate(labels) if lb == "train"]
    n_val = max(1, int(round(VAL_FRACTION * len(train))))
    if len(train) < 2:
        raise DataError(f"{label}: no validation entries and only {len(train)} training entries to take them from")
    picked = random.Random(seed).sample(train, n_val)
    out = list(labels)
    for i in picked:
        out[i] = "val"
    logger.warning("%s: no validation entries in the split column: %d of the %d training entries (%d%%, seed %d) "
                   "are used for validation", label, n_val, len(train), round(100 * VAL_FRACTION), seed)
    return out


def assign_splits(src: Source, key: str, tinfo: Optional[TargetInfo], usable: Sequence[Entry], split: str,
                  seed: int) -> Tuple[str, List[Optional[str]]]:
    """(protocol description, [split label or None (unused) per usable entry])."""
    split = (split or "auto").lower()
    if split not in PROTOCOLS:
        raise DataError(f"split must be one of {', '.join(PROTOCOLS)}, got {split!r}")
    n = len(usable)
    spec = dataset_spec(src.name)

    if spec is not None and spec.split_per_target:
        split_targets = src.extra.get("split_targets", [])
        if split in ("auto", "leaderboard") and key in split_targets:
            labels = [norm_split(e.split_by_target.get(key)) for e in usable]
            if all(lb is not None for lb in labels):
                return "leaderboard", labels
        if split == "leaderboard":
            raise DataError(f"{src.name}: the JARVIS-Leaderboard has no split for {key!r} (only {split_targets}); "
                            "use split='paper'")
    if split == "auto":
        split = ("column" if src.extra.get("has_split_column") else
                 "paper" if spec is not None else "random")

    if split == "column":
        labels = [e.split for e in usable]
        if src.name not in ("csv", "json") or all(lb is None for lb in labels):
            raise DataError(f"{src.label}: split='column' needs a 'split' column with train/val/test values")
        bad = sum(1 for lb in labels if lb is None)
        if bad:
            logger.warning("%s: %d entries have no recognised split value (train/val/test) and are left out", src.label, bad)
        if "val" not in labels and "train" in labels:
            return f"column (validation carved from train, seed {seed})", carve_validation(labels, seed, src.label)
        return "column", labels

    if split == "leaderboard":
        task = tinfo.leaderboard_task if tinfo else None
        membership = leaderboard_membership(task) if task else None
        if membership is not None:
            labels = [membership.get(e.id) for e in usable]
            missing = sum(1 for lb in labels if lb is None)
            logger.info("%s: JARVIS-Leaderboard task %s: %d of its %d ids found in the data; %d usable entries not in it",
                        src.label, task, n - missing, len(membership), missing)
            return f"leaderboard ({task})", labels
        labels = [e.split for e in usable]
        if any(lb is not None for lb in labels):
            return "leaderboard (records' leaderboard_split)", labels
        raise DataError(f"{src.label}: split='leaderboard' needs the jarvis_leaderboard package "
                        f"(pip install jarvis-leaderboard==2024.10.30){' with task ' + task if task else ''} "
                        "or records with a 'leaderboard_split' field")

    if split == "random":
        sizes = random_split_sizes(n)
        return f"random (seed {seed}, {'/'.join(map(str, sizes))})", _labels(n, paper_split(n, seed, sizes))

    sizes = tinfo.fixed_split if tinfo is not None else None
    if sizes is not None and n < sum(sizes):
        logger.warning("%s: %d usable entries < %d: using 80/10/10 instead of the reference's fixed %s",
                       src.label, n, sum(sizes), "/".join(map(str, sizes)))
        sizes = None
    sizes = paper_split_sizes(n, sizes)
    return f"paper (seed {seed}, {'/'.join(map(str, sizes))})", _labels(n, paper_split(n, seed, sizes))


__all__ = ["PROTOCOLS", "SPLIT_SEED", "VAL_FRACTION", "assign_splits", "carve_validation",
           "paper_split", "paper_split_sizes", "random_split_sizes"]
