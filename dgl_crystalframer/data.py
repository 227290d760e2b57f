"""Datasets, the paper's splits and the on-disk graph cache.

``load_dataset(source, target, ...)`` returns ``DatasetSplits(train, val, test, info)``; each
split is a ``CrystalGraphDataset`` of ``(graph, target [1])`` items with ``.ids``, batched by
``collate``.  Sources:

* ``"megnet_sample"``: the real-data sample embedded in the package (``sample/README.md``):
  6,284 Materials Project crystals; targets ``e_form``, ``gap_pbe`` (official JARVIS-Leaderboard
  split), ``log10_k_vrh``/``bulk`` and ``log10_g_vrh``/``shear`` (paper protocol, seed 123).
* ``"dft_3d_2021"`` and ``"megnet"``: jarvis-tools datasets, read with
  ``jarvis.db.figshare.data(name, store_dir=data_dir)``.  The file is looked for first; when it
  is absent and cannot be downloaded the error says which file to put where.
* a path: a CSV (id column + structure text or file path column + target columns), a folder
  with ``id_prop.csv`` (ALIGNN/CGCNN convention) and CIF/POSCAR files, or a JSON / JSON.zip
  list of jarvis-style records (``atoms`` dict + target keys).

Split protocols (SPEC.md 6): ``"paper"`` -- drop non-finite targets, ``random.seed(seed)``,
``random.shuffle`` of the index list, train = first n_train, val = ``ids[-(n_val+n_test):-n_test]``,
test = last n_test with n_val = n_test = int(0.1 n), n_train = n - n_val - n_test (this
reproduces 44578/5572/5572, 14537/1817/1817 and 44296/5537/5537); for jarvis "megnet" e_form and
gap the reference uses the fixed sizes 60000/5000/4239.  ``"leaderboard"`` -- the official
JARVIS-Leaderboard membership.  ``"column"`` -- a ``split`` column of a user CSV.  ``"auto"``
picks leaderboard for the sample's e_form/gap, column when a CSV has one, paper otherwise.

Graphs are cached under ``cache_dir`` (default ``$DGL_CRYSTALFRAMER_CACHE`` or
``~/.cache/dgl_crystalframer``) in chunks of ``CHUNK_SIZE`` graphs; see ``GraphCache``.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from ._dgl import dgl
from .basis import default_cutoff
from .batch import collate
from .graph import StructureError, build_graph

logger = logging.getLogger(__name__)

# Bump when the graph content for the same input changes (graph.py may define its own too).
GRAPH_FORMAT_VERSION = 2  # 2: ndata lattice_frame / lattice_tied
CACHE_ENV = "DGL_CRYSTALFRAMER_CACHE"
OFFLINE_ENV = "DGL_CRYSTALFRAMER_OFFLINE"  # "1": never try to download (jarvis sources fail fast)
CHUNK_SIZE = 1000  # graphs per cache file: an interrupted build keeps every finished chunk
SPLIT_SEED = 123
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "megnet_sample.json.gz")
SPLITS = ("train", "val", "test")
_LOG_EACH = 20  # structure failures logged one by one (WARNING); the rest go to INFO + a summary


# ============================================================================================
# targets: names, aliases, units


@dataclass(frozen=True)
class TargetInfo:
    key: str  # the key in the source's records
    unit: str
    description: str
    aliases: Tuple[str, ...] = ()
    joint: Tuple[str, ...] = ()  # filtered together with these keys (shared split), SPEC.md 6
    leaderboard_task: Optional[str] = None  # jarvis_leaderboard .../SinglePropertyPrediction/<task>.json.zip


_DFT3D_JOINT = ("formation_energy_peratom", "optb88vdw_total_energy", "optb88vdw_bandgap")
_MEGNET_JOINT = ("e_form", "gap pbe")

TARGETS: Dict[str, Dict[str, TargetInfo]] = {
    "megnet_sample": {
        "e_form": TargetInfo("e_form", "eV/atom", "formation energy per atom (MP 2018.6.1)", ("formation_energy", "formation_energy_per_atom", "eform")),
        "gap_pbe": TargetInfo("gap_pbe", "eV", "PBE band gap (MP 2018.6.1)", ("gap pbe", "gap", "bandgap", "band_gap")),
        "log10_k_vrh": TargetInfo("log10_k_vrh", "log10(GPa)", "log10 bulk modulus K_VRH", ("bulk", "bulk modulus", "bulk_modulus", "k_vrh")),
        "log10_g_vrh": TargetInfo("log10_g_vrh", "log10(GPa)", "log10 shear modulus G_VRH", ("shear", "shear modulus", "shear_modulus", "g_vrh")),
    },
    "dft_3d_2021": {
        "formation_energy_peratom": TargetInfo(
            "formation_energy_peratom", "eV/atom", "formation energy per atom (OptB88vdW)",
            ("e_form", "eform", "formation_energy"), _DFT3D_JOINT, "dft_3d_formation_energy_peratom"),
        "optb88vdw_total_energy": TargetInfo(
            "optb88vdw_total_energy", "eV/atom", "total energy per atom (OptB88vdW)",
            ("e_total", "total_energy"), _DFT3D_JOINT, "dft_3d_optb88vdw_total_energy"),
        "optb88vdw_bandgap": TargetInfo(
            "optb88vdw_bandgap", "eV", "band gap (OptB88vdW)",
            ("bandgap", "opt_bandgap", "bg_opt", "gap"), _DFT3D_JOINT, "dft_3d_optb88vdw_bandgap"),
        "mbj_bandgap": TargetInfo("mbj_bandgap", "eV", "band gap (TBmBJ)", ("mbj", "bg_mbj"), (), "dft_3d_mbj_bandgap"),
        "ehull": TargetInfo("ehull", "eV", "energy above the convex hull", ("e_hull",), (), "dft_3d_ehull"),
    },
    "megnet": {
        "e_form": TargetInfo("e_form", "eV/atom", "formation energy per atom (MP 2018.6.1)",
                             ("formation_energy", "formation_energy_per_atom", "eform"), _MEGNET_JOINT, "megnet_e_form"),
        "gap pbe": TargetInfo("gap pbe", "eV", "PBE band gap (MP 2018.6.1)",
                              ("gap_pbe", "gap", "bandgap", "band_gap"), _MEGNET_JOINT, "megnet_gappbe"),
        "bulk modulus": TargetInfo("bulk modulus", "log10(GPa)", "log10 bulk modulus K_VRH",
                                   ("bulk", "bulk_modulus", "log10_k_vrh", "k_vrh")),
        "shear modulus": TargetInfo("shear modulus", "log10(GPa)", "log10 shear modulus G_VRH",
                                    ("shear", "shear_modulus", "log10_g_vrh", "g_vrh")),
    },
}
TARGET_ALIASES: Dict[str, Dict[str, str]] = {
    src: {alias: key for key, t in tgts.items() for alias in (key, *t.aliases)} for src, tgts in TARGETS.items()
}
TARGET_UNITS: Dict[str, Dict[str, str]] = {src: {key: t.unit for key, t in tgts.items()} for src, tgts in TARGETS.items()}

# jarvis-tools dataset files (also read from jarvis.db.figshare.get_db_info() when available)
JARVIS_FILES = {
    "dft_3d_2021": ("https://ndownloader.figshare.com/files/29204826", "jdft_3d-8-18-2021.json", "jid"),
    "megnet": ("https://ndownloader.figshare.com/files/26724977", "megnet.json", "id"),
}
# megnet e_form / gap: the reference (Crystalformer's download_jarvis.py) uses fixed split sizes
MEGNET_FIXED_SIZES = (60000, 5000, 4239)


def resolve_target(source: str, target: str) -> str:
    """The record key of ``target`` (an alias or the key itself) for a named source."""
    table = TARGET_ALIASES.get(source)
    if table is None:
        return target
    if target in table:
        return table[target]
    norm = str(target).strip().lower().replace("-", "_")
    for alias, key in table.items():
        if alias.lower().replace("-", "_") == norm or alias.lower().replace(" ", "_") == norm:
            return key
    raise ValueError(f"unknown target {target!r} for {source!r}; known: {', '.join(TARGETS[source])} "
                     f"(aliases: {', '.join(sorted(a for a in table if a not in TARGETS[source]))})")


def target_unit(source: str, target: str) -> str:
    try:
        return TARGET_UNITS[source][resolve_target(source, target)]
    except (KeyError, ValueError):
        return ""


# ============================================================================================
# dataset objects


class CrystalGraphDataset(torch.utils.data.Dataset):
    """A list of crystal graphs with one target each: items are ``(graph, target float32 [1])``."""

    def __init__(self, graphs: Sequence[Any], targets: Any, ids: Sequence[str], target: str = "", unit: str = ""):
        arr = np.asarray(targets, dtype=np.float32)
        width = arr.shape[-1] if arr.ndim == 2 else 1
        targets = torch.as_tensor(arr.reshape(len(graphs), width) if len(graphs) else np.zeros((0, width), np.float32))
        if len(ids) != len(graphs):
            raise ValueError(f"{len(ids)} ids for {len(graphs)} graphs")
        if torch.isnan(targets).any():
            raise ValueError("targets contain NaN (entries with missing targets must be dropped before)")
        self.graphs = list(graphs)
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
# splits


def paper_split_sizes(n: int, fixed: Optional[Tuple[int, int, int]] = None) -> Tuple[int, int, int]:
    """(n_train, n_val, n_test): 80/10/10 as n_val = n_test = int(0.1 n), n_train = the rest."""
    if fixed is not None:
        if sum(fixed) > n:
            raise ValueError(f"split sizes {fixed} need {sum(fixed)} entries, only {n} usable")
        return fixed
    n_val = n_test = int(0.1 * n)
    return n - n_val - n_test, n_val, n_test


def paper_split(n: int, seed: int = SPLIT_SEED, sizes: Optional[Tuple[int, int, int]] = None) -> Tuple[List[int], List[int], List[int]]:
    """Index lists (train, val, test) exactly as the reference: random.seed + random.shuffle."""
    n_train, n_val, n_test = paper_split_sizes(n, sizes)
    ids = list(range(n))
    random.seed(seed)
    random.shuffle(ids)
    train = ids[:n_train]
    val = ids[-(n_val + n_test):-n_test] if n_test > 0 else ids[len(ids) - n_val:] if n_val else []
    test = ids[-n_test:] if n_test > 0 else []
    return train, val, test


_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def _norm_split(value: Any) -> Optional[str]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _SPLIT_NAMES.get(str(value).strip().lower())


# ============================================================================================
# raw entries and target parsing


@dataclass
class _Entry:
    id: str
    make: Callable[[], Any]  # -> something graph.build_graph accepts (may raise StructureError)
    values: Dict[str, Any]  # raw target values by key
    split: Optional[str] = None  # a given split label (leaderboard / CSV column)
    split_by_target: Dict[str, Any] = field(default_factory=dict)  # megnet_sample: leaderboard membership per target


@dataclass
class _Source:
    name: str  # "megnet_sample", "dft_3d_2021", "megnet", "csv", "folder", "json"
    label: str  # for messages and the cache folder name
    identity: Dict[str, Any]  # what the graph cache is keyed on
    entries: List[_Entry]
    target_keys: List[str] = field(default_factory=list)  # available targets
    extra: Dict[str, Any] = field(default_factory=dict)


def _to_float(value: Any) -> Optional[float]:
    """Finite float or None for NaN / inf / "na" / "" / None / non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
    else:
        s = str(value).strip()
        if s.lower() in ("", "na", "nan", "n/a", "none", "null", "inf", "-inf", "+inf"):
            return None
        try:
            v = float(s)
        except ValueError:
            return None
    return v if math.isfinite(v) else None


def _structure_from_text(text: str, entry_id: str, fmt: Optional[str] = None):
    """pymatgen Structure from CIF or POSCAR text; StructureError naming the entry on failure."""
    from pymatgen.core import Structure

    if fmt is None:
        fmt = "cif" if (re.search(r"^\s*data_", text, re.M) or "_cell_length_a" in text) else "poscar"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Structure.from_str(text, fmt=fmt)
    except Exception as exc:  # pymatgen raises many kinds
        raise StructureError(f"{entry_id}: cannot parse {fmt.upper()} text ({type(exc).__name__}: {exc})") from exc


def _structure_from_file(path: str, entry_id: str):
    if not os.path.isfile(path):
        raise StructureError(f"{entry_id}: structure file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise StructureError(f"{entry_id}: cannot read {path} ({exc})") from exc
    low = path.lower()
    fmt = "cif" if low.endswith(".cif") else ("poscar" if low.endswith((".vasp", ".poscar")) or "poscar" in os.path.basename(low) or "contcar" in os.path.basename(low) else None)
    return _structure_from_text(text, entry_id, fmt)


def _structure_from_record(rec: Dict[str, Any], entry_id: str):
    """jarvis ``atoms`` dict, pymatgen dict, or CIF/POSCAR text in a JSON record."""
    if "atoms" in rec and rec["atoms"] is not None:
        atoms = rec["atoms"]
        if isinstance(atoms, str):
            return _structure_from_text(atoms, entry_id)
        return atoms  # jarvis Atoms dict: graph.py reads it
    s = rec.get("structure")
    if isinstance(s, str):
        return _structure_from_text(s, entry_id)
    if isinstance(s, dict):
        if "lattice_mat" in s:
            return s
        from pymatgen.core import Structure

        try:
            return Structure.from_dict(s)
        except Exception as exc:
            raise StructureError(f"{entry_id}: cannot read the pymatgen structure dict ({type(exc).__name__}: {exc})") from exc
    raise StructureError(f"{entry_id}: record has no 'atoms' (jarvis dict) or 'structure' (CIF/POSCAR text or pymatgen dict)")


def _file_identity(path: str) -> Dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ============================================================================================
# sources


def _sample_source(path: str = SAMPLE_PATH) -> _Source:
    with open(path, "rb") as fh:
        raw = fh.read()
    doc = json.loads(gzip.decompress(raw))
    entries = []
    for e in doc["entries"]:
        def make(e=e):
            if all(isinstance(s, str) for s in e["species"]):
                return {"lattice_mat": e["lattice"], "coords": e["frac_coords"], "elements": e["species"], "cartesian": False}
            from pymatgen.core import Lattice, Structure

            return Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"])

        entries.append(_Entry(e["id"], make, dict(e["targets"]), None, dict(e.get("split") or {})))
    return _Source("megnet_sample", "megnet_sample", {"sample_sha256": hashlib.sha256(raw).hexdigest()}, entries,
                   list(TARGETS["megnet_sample"]), {"split_targets": doc.get("split_targets", [])})


def _jarvis_store_dir(data_dir: Optional[str]) -> str:
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    try:
        from jarvis.core import utils as jutils

        if hasattr(jutils, "get_cache_dir"):  # jarvis-tools >= 2026: $ATOMGPTLAB_CACHE/jarvis_data
            base = os.environ.get("ATOMGPTLAB_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "atomgptlab"))
            return os.path.join(base, "jarvis_data")
        import jarvis.db.figshare as fs  # older jarvis-tools: next to figshare.py

        return os.path.dirname(os.path.abspath(fs.__file__))
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "atomgptlab", "jarvis_data")


def _can_reach(url: str, timeout: float = 3.0) -> bool:
    """True if a TCP connection to the URL's host:443 opens within ``timeout`` (DNS included)."""
    host = re.sub(r"^https?://", "", url).split("/")[0]
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return result["ok"]


def _jarvis_file(dataset: str) -> Tuple[str, str]:
    """(url, json member name) as the installed jarvis-tools knows them; our table as fallback."""
    url, js_tag, _ = JARVIS_FILES[dataset]
    try:
        from jarvis.db.figshare import get_db_info

        info = get_db_info().get(dataset)
        if info and str(info[1]).endswith(".json"):
            url, js_tag = str(info[0]), str(info[1])
    except Exception:  # old/new jarvis-tools without get_db_info: keep the table
        pass
    return url, js_tag


def _jarvis_records(dataset: str, data_dir: Optional[str]) -> Tuple[List[Dict[str, Any]], str]:
    url, js_tag = _jarvis_file(dataset)
    store = _jarvis_store_dir(data_dir)
    path = os.path.join(store, js_tag + ".zip")
    if not os.path.isfile(path):
        offline = os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")
        reason = f"{OFFLINE_ENV} is set" if offline else (None if _can_reach(url) else "the download host cannot be reached")
        if reason:
            raise FileNotFoundError(
                f"{dataset}: the jarvis-tools data file {js_tag}.zip is not in {store} and cannot be downloaded "
                f"({reason}). Download {url} (jarvis-tools' URL), save it as {path} "
                f"(or put it in another folder and pass data_dir=/ --data-dir), then run again."
            )
        os.makedirs(store, exist_ok=True)
        logger.info("%s: downloading %s to %s with jarvis-tools", dataset, url, path)
    from jarvis.db.figshare import data as jarvis_data

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            records = jarvis_data(dataset, store_dir=store)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise RuntimeError(f"{dataset}: cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged or "
                           f"incomplete: delete it and download {url} again") from exc
    for line in out.getvalue().splitlines():
        logger.debug("jarvis-tools: %s", line)
    return records, path


def _jarvis_source(dataset: str, data_dir: Optional[str]) -> _Source:
    records, path = _jarvis_records(dataset, data_dir)
    id_key = JARVIS_FILES[dataset][2]
    entries = []
    for k, rec in enumerate(records):
        rid = str(rec.get(id_key, rec.get("jid", rec.get("id", k))))
        entries.append(_Entry(rid, (lambda rec=rec, rid=rid: _structure_from_record(rec, rid)), rec, _norm_split(rec.get("leaderboard_split"))))
    return _Source(dataset, dataset, {"dataset": dataset, **_file_identity(path)}, entries, list(TARGETS[dataset]), {"path": path})


def _csv_source(path: str) -> _Source:
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cols = {c.lower().strip(): c for c in df.columns}
    id_col = next((cols[c] for c in ("id", "jid", "material_id", "mpid", "name") if c in cols), df.columns[0])
    struct_col = next((cols[c] for c in ("structure", "cif", "poscar", "atoms") if c in cols), None)
    path_col = next((cols[c] for c in ("path", "file", "filepath", "file_path", "filename", "structure_path", "structure_file") if c in cols), None)
    if struct_col is None and path_col is None:
        raise ValueError(f"{path}: need a structure column (CIF or POSCAR text: structure/cif/poscar) or a path column "
                         f"(path/file/filename); columns are {list(df.columns)}")
    split_col = cols.get("split")
    base = os.path.dirname(os.path.abspath(path))
    identity = {"csv": _file_identity(path)}
    entries = []
    file_stats = []
    for _, row in df.iterrows():
        rid = str(row[id_col])
        if struct_col is not None and str(row[struct_col]).strip():
            make = (lambda text=str(row[struct_col]), rid=rid: _structure_from_text(text, rid))
        elif path_col is not None:
            fpath = os.path.join(base, os.path.expanduser(str(row[path_col])))
            make = (lambda fpath=fpath, rid=rid: _structure_from_file(fpath, rid))
            try:
                st = os.stat(fpath)
                file_stats.append((fpath, st.st_size, st.st_mtime_ns))
            except OSError:
                file_stats.append((fpath, None, None))
        else:
            make = (lambda rid=rid: (_ for _ in ()).throw(StructureError(f"{rid}: empty structure cell")))
        values = {c: row[c] for c in df.columns if c not in (id_col, struct_col, path_col, split_col)}
        entries.append(_Entry(rid, make, values, _norm_split(row[split_col]) if split_col else None))
    if file_stats:
        identity["files"] = hashlib.sha256(json.dumps(file_stats).encode()).hexdigest()
    targets = [c for c in df.columns if c not in (id_col, struct_col, path_col, split_col)]
    return _Source("csv", os.path.splitext(os.path.basename(path))[0], identity, entries, targets, {"has_split_column": split_col is not None})


def _folder_source(folder: str) -> _Source:
    import pandas as pd

    id_prop = os.path.join(folder, "id_prop.csv")
    df = pd.read_csv(id_prop, header=None, dtype=str, keep_default_na=False, skipinitialspace=True)
    if df.shape[1] < 2:  # some id_prop files are whitespace separated
        df = pd.read_csv(id_prop, header=None, dtype=str, keep_default_na=False, sep=r"\s+")
    if df.shape[1] < 2:
        raise ValueError(f"{id_prop}: expected 'filename,target' rows (no header)")
    n_targets = df.shape[1] - 1
    entries, file_stats = [], []
    for _, row in df.iterrows():
        name = str(row[0]).strip()
        fpath = os.path.join(folder, name)
        if not os.path.isfile(fpath):
            for ext in (".cif", ".vasp", ".poscar", ".POSCAR"):
                if os.path.isfile(fpath + ext):
                    fpath = fpath + ext
                    break
        try:
            st = os.stat(fpath)
            file_stats.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            file_stats.append((name, None, None))
        values = {str(k): row[k + 1] for k in range(n_targets)}
        values["target"] = row[1]
        entries.append(_Entry(name, (lambda fpath=fpath, name=name: _structure_from_file(fpath, name)), values))
    identity = {"id_prop": _file_identity(id_prop), "files": hashlib.sha256(json.dumps(file_stats).encode()).hexdigest()}
    return _Source("folder", os.path.basename(os.path.abspath(folder)), identity, entries, ["target"] + [str(k) for k in range(n_targets)])


def _json_source(path: str) -> _Source:
    if path.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith(".json")] or zf.namelist()
            if len(members) != 1:
                raise ValueError(f"{path}: expected one JSON member, found {members}")
            records = json.loads(zf.read(members[0]))
    elif path.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            records = json.load(fh)
    else:
        with open(path, "r", encoding="utf-8") as fh:
            records = json.load(fh)
    if isinstance(records, dict) and isinstance(records.get("entries"), list):
        records = records["entries"]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    entries = []
    for k, rec in enumerate(records):
        rid = str(next((rec[key] for key in ("jid", "id", "material_id") if key in rec), k))
        split = _norm_split(rec.get("split")) or _norm_split(rec.get("leaderboard_split"))
        entries.append(_Entry(rid, (lambda rec=rec, rid=rid: _structure_from_record(rec, rid)), rec, split))
    keys = sorted({k for rec in records[:100] for k, v in rec.items() if _to_float(v) is not None})
    name = os.path.basename(path)
    for ext in (".zip", ".gz", ".json"):
        name = name[: -len(ext)] if name.lower().endswith(ext) else name
    return _Source("json", name, {"json": _file_identity(path)}, entries, keys,
                   {"has_split_column": any(_norm_split(r.get("split")) for r in records[:1000] if isinstance(r, dict))})


def _dedupe_ids(src: _Source) -> _Source:
    """Keep every entry (split positions must not move) but make ids unique: id, id#2, id#3, ..."""
    seen: Dict[str, int] = {}
    renamed = []
    for e in src.entries:
        k = seen.get(e.id, 0) + 1
        seen[e.id] = k
        if k > 1:
            renamed.append(e.id)
            e.id = f"{e.id}#{k}"
    if renamed:
        logger.warning("%s: %d duplicate ids renamed to id#2, id#3, ... (first: %s)", src.label, len(renamed), ", ".join(renamed[:5]))
    return src


def _open_source(source: str, data_dir: Optional[str]) -> _Source:
    return _dedupe_ids(_open_source_raw(source, data_dir))


def _open_source_raw(source: str, data_dir: Optional[str]) -> _Source:
    if source == "megnet_sample":
        return _sample_source()
    if source in JARVIS_FILES:
        return _jarvis_source(source, data_dir)
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "id_prop.csv")):
            raise FileNotFoundError(f"{path}: a dataset folder needs an id_prop.csv (rows 'filename,target', no header)")
        return _folder_source(path)
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".csv"):
            return _csv_source(path)
        if low.endswith((".json", ".json.zip", ".json.gz", ".zip")):
            return _json_source(path)
        raise ValueError(f"{path}: unsupported file type (use .csv, .json, .json.zip or a folder with id_prop.csv)")
    if source == "dft_3d":
        raise ValueError("'dft_3d' points to newer, larger JARVIS snapshots; the paper uses 'dft_3d_2021'")
    raise ValueError(f"unknown dataset {source!r}: use megnet_sample, dft_3d_2021, megnet, or a path to a CSV, "
                     "a JSON/JSON.zip list of records, or a folder with id_prop.csv")


# ============================================================================================
# leaderboard membership


def leaderboard_membership(task: str) -> Optional[Dict[str, str]]:
    """{id: split} from the installed jarvis_leaderboard package, or None if it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("jarvis_leaderboard")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, "benchmarks", "AI", "SinglePropertyPrediction", task + ".json.zip")
    if not os.path.isfile(path):
        return None
    with zipfile.ZipFile(path) as zf:
        data = json.loads(zf.read(zf.namelist()[0]))
    return {str(i): s for s in SPLITS for i in data.get(s, {})}


# ============================================================================================
# graph cache


class GraphCache:
    """Chunked, id-keyed, self-checking cache of built graphs in one folder.

    Each chunk is ``chunk-<tag>.bin`` (``dgl.save_graphs``) plus ``chunk-<tag>.json`` (ids,
    failed ids with reasons, the .bin's size and sha256, the cache key).  Both are written to
    a temporary file and ``os.replace``d (the .json last), so a chunk is either complete or
    ignored.  On load, a chunk whose json does not parse, whose key differs, whose .bin is
    missing, has another size or sha256, does not load, or holds another number of graphs than
    ids is logged, deleted and its entries rebuilt.  Chunks are added as building proceeds, so an
    interrupted build resumes where it stopped.
    """

    def __init__(self, folder: str, key: str, meta: Dict[str, Any]):
        self.folder = folder
        self.key = key
        self.meta = meta

    def load(self, wanted: Optional[set] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """({id: graph}, {id: failure reason}) of all valid chunks (only chunks holding a ``wanted`` id)."""
        graphs: Dict[str, Any] = {}
        failed: Dict[str, str] = {}
        if not os.path.isdir(self.folder):
            return graphs, failed
        for manifest in sorted(glob.glob(os.path.join(self.folder, "chunk-*.json"))):
            try:
                got_graphs, got_failed = self._load_chunk(manifest, wanted)
            except Exception as exc:  # anything odd: never trust it
                logger.warning("graph cache: discarding %s (%s: %s); its entries will be rebuilt", manifest, type(exc).__name__, exc)
                self._remove_chunk(manifest)
                continue
            for k, v in got_graphs.items():
                graphs.setdefault(k, v)
            for k, v in got_failed.items():
                failed.setdefault(k, v)
        self._remove_orphans()
        return graphs, failed

    def _remove_orphans(self, min_age_s: float = 3600.0) -> None:
        """Graph files without a manifest and temporary files left by a killed writer (old ones only:
        a young one may belong to a build running in another process)."""
        now = time.time()
        for p in glob.glob(os.path.join(self.folder, "chunk-*.bin")) + glob.glob(os.path.join(self.folder, "chunk-*.tmp")):
            if p.endswith(".bin") and os.path.exists(p[: -len(".bin")] + ".json"):
                continue
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(p) > min_age_s:
                    os.remove(p)

    def _load_chunk(self, manifest: str, wanted: Optional[set] = None):
        with open(manifest, "r", encoding="utf-8") as fh:
            info = json.load(fh)
        if info.get("key") != self.key:
            raise ValueError("stale chunk (cache key differs)")
        ids, failed = [str(i) for i in info["ids"]], {str(k): str(v) for k, v in info.get("failed", {}).items()}
        if not ids or (wanted is not None and wanted.isdisjoint(ids)):
            return {}, failed
        binpath = os.path.join(self.folder, info["bin"])
        if os.path.getsize(binpath) != info["size"]:
            raise ValueError("graph file has the wrong size (truncated?)")
        if _sha256_file(binpath) != info["sha256"]:
            raise ValueError("graph file checksum mismatch")
        graphs, _ = dgl.load_graphs(binpath)
        if len(graphs) != len(ids):
            raise ValueError(f"{len(graphs)} graphs for {len(ids)} ids")
        for g in graphs:
            if "rvec" not in g.edata or "species" not in g.ndata:
                raise ValueError("graph without the expected features")
        return dict(zip(ids, graphs)), failed

    def _remove_chunk(self, manifest: str) -> None:
        for p in (manifest, manifest[: -len(".json")] + ".bin"):
            with contextlib.suppress(OSError):
                os.remove(p)

    def add(self, ids: List[str], graphs: List[Any], failed: Dict[str, str]) -> None:
        if not ids and not failed:
            return
        os.makedirs(self.folder, exist_ok=True)
        tag = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        info: Dict[str, Any] = {"key": self.key, "meta": self.meta, "ids": ids, "failed": failed, "bin": f"chunk-{tag}.bin"}
        if ids:
            binpath = os.path.join(self.folder, info["bin"])
            tmp = binpath + ".tmp"
            dgl.save_graphs(tmp, graphs)
            info["size"] = os.path.getsize(tmp)
            info["sha256"] = _sha256_file(tmp)
            os.replace(tmp, binpath)
        manifest = os.path.join(self.folder, f"chunk-{tag}.json")
        tmp = manifest + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(tmp, manifest)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "dgl_crystalframer")))


def _graph_version() -> str:
    from . import __version__

    return f"{GRAPH_FORMAT_VERSION}.0/{__version__}"  # the ".0" keeps existing cache keys valid


def _cache_for(src: _Source, cutoff: float, cache_dir: Optional[str]) -> GraphCache:
    meta = {"source": src.identity, "cutoff": round(float(cutoff), 6), "graph_format": _graph_version()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:20]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.label)[:40] or "data"
    return GraphCache(os.path.join(cache_dir or default_cache_dir(), f"{label}-{key}"), key, meta)


def _build_graphs(entries: List[_Entry], cutoff: float, cache: Optional[GraphCache], progress: bool, desc: str):
    """{id: graph}, {id: reason}, stats; cached graphs are reused, new ones are built and stored."""
    wanted = {e.id for e in entries}
    if cache is not None:
        graphs, failed = cache.load(wanted)
    else:
        graphs, failed = {}, {}
    from_cache = len(wanted & set(graphs)) + len(wanted & set(failed))
    todo = [e for e in entries if e.id not in graphs and e.id not in failed]
    t0 = time.perf_counter()
    if todo:
        from tqdm.auto import tqdm

        buf_ids: List[str] = []
        buf_graphs: List[Any] = []
        buf_failed: Dict[str, str] = {}

        state = {"cache": cache}

        def flush():
            if state["cache"] is not None and (buf_ids or buf_failed):
                try:
                    state["cache"].add(list(buf_ids), list(buf_graphs), dict(buf_failed))
                except OSError as exc:  # unwritable / full disk: go on without caching
                    logger.warning("graph cache: cannot write to %s (%s); continuing without caching", state["cache"].folder, exc)
                    state["cache"] = None
            buf_ids.clear(), buf_graphs.clear(), buf_failed.clear()

        bar = tqdm(total=len(todo), desc=f"building graphs ({desc})", unit="crystal", disable=not progress, mininterval=1.0)
        try:
            for e in todo:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        g = build_graph(e.make(), cutoff=cutoff, entry_id=e.id)
                except StructureError as exc:
                    failed[e.id] = buf_failed[e.id] = str(exc)
                except Exception as exc:  # unexpected: still skip the entry, but say what happened
                    failed[e.id] = buf_failed[e.id] = f"{e.id}: {type(exc).__name__}: {exc}"
                else:
                    graphs[e.id] = g
                    buf_ids.append(e.id)
                    buf_graphs.append(g)
                bar.update(1)
                if len(buf_ids) + len(buf_failed) >= CHUNK_SIZE:
                    flush()
        finally:  # also on Ctrl-C: keep what was built
            flush()
            bar.close()
    return graphs, failed, {"n_built": len(todo), "n_from_cache": from_cache, "build_seconds": time.perf_counter() - t0}


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
) -> DatasetSplits:
    """Load ``source`` for ``target`` and split it; see the module docstring.

    split: "auto" | "paper" | "leaderboard" | "column".  cutoff: neighbour cutoff in Angstrom
    (None: ``basis.default_cutoff()``).  Entries with missing / non-finite targets and
    structures that fail are skipped, counted in ``info`` and logged.
    """
    cutoff = default_cutoff() if cutoff is None else float(cutoff)
    src = _open_source(source, data_dir)
    key, unit, tinfo = _target_key(src, source, target)
    joint = list(tinfo.joint) if (tinfo is not None and key in tinfo.joint) else [key]

    # 1. usable targets (joint filter: the first three dft_3d targets / megnet e_form+gap share one split)
    usable: List[Tuple[_Entry, float]] = []
    skipped: List[str] = []
    for e in src.entries:
        vals = [_to_float(e.values.get(k)) for k in joint]
        if any(v is None for v in vals):
            skipped.append(e.id)
            continue
        usable.append((e, vals[joint.index(key)]))
    log_unit_note = _maybe_log10(src, key, usable)
    if log_unit_note:
        usable = [(e, math.log10(v)) for e, v in usable if v > 0]
    if skipped:
        what = f"targets {joint}" if len(joint) > 1 else f"target {key!r}"
        logger.info("%s: skipped %d of %d entries whose %s is missing, NaN, inf or 'na' (first: %s)",
                    src.label, len(skipped), len(src.entries), what, ", ".join(skipped[:5]))
        for sid in skipped:
            logger.debug("%s: skipped %s: missing or non-finite target", src.label, sid)
    if not usable:
        raise ValueError(f"{src.label}: no entries with a usable value of target {key!r} "
                         f"({len(src.entries)} entries, {len(skipped)} with missing/non-finite targets)")

    # 2. split membership
    protocol, assignment = _assign_splits(src, source, key, tinfo, usable, split, seed)

    # 3. graphs
    chosen = [(e, y, s) for (e, y), s in zip(usable, assignment) if s is not None]
    cache = _cache_for(src, cutoff, cache_dir) if use_cache else None
    graphs, failed_all, stats = _build_graphs([e for e, _, _ in chosen], cutoff, cache, progress, src.label)
    failed = {e.id: failed_all[e.id] for e, _, _ in chosen if e.id in failed_all}
    if failed:
        for k, (fid, reason) in enumerate(failed.items()):
            logger.log(logging.WARNING if k < _LOG_EACH else logging.INFO, "%s: skipped structure %s: %s", src.label, fid, reason)
        logger.warning("%s: skipped %d structure(s) that could not be turned into graphs (ids and reasons in info['failed'])",
                       src.label, len(failed))

    parts: Dict[str, Tuple[List[Any], List[float], List[str]]] = {s: ([], [], []) for s in SPLITS}
    for e, y, s in chosen:
        if e.id in graphs and e.id not in failed:
            parts[s][0].append(graphs[e.id])
            parts[s][1].append(y)
            parts[s][2].append(e.id)
    datasets = {s: CrystalGraphDataset(g, np.asarray(y, dtype=np.float32).reshape(-1, 1), i, key, unit) for s, (g, y, i) in parts.items()}
    n_used = sum(len(d) for d in datasets.values())
    if n_used == 0:
        raise ValueError(f"{src.label}: zero usable entries for target {key!r} ({len(skipped)} missing targets, {len(failed)} failed structures)")
    info = {
        "source": source if src.name in ("megnet_sample", "dft_3d_2021", "megnet") else src.name,
        "path": src.extra.get("path") or (None if src.name == "megnet_sample" else os.path.abspath(os.path.expanduser(str(source)))),
        "target": key,
        "unit": unit,
        "split": protocol,
        "seed": seed,
        "cutoff": cutoff,
        "sizes": {s: len(d) for s, d in datasets.items()},
        "n_entries": len(src.entries),
        "n_skipped_target": len(skipped),
        "n_failed": len(failed),
        "failed": failed,
        "n_unassigned": sum(1 for s in assignment if s is None),
        "cache": cache.folder if cache is not None else None,
        **stats,
    }
    if log_unit_note:
        info["note"] = log_unit_note
    logger.info("%s/%s: %d train / %d val / %d test (%s split); %d skipped (target), %d failed structures; "
                "%d graphs built in %.1f s, %d from cache",
                src.label, key, info["sizes"]["train"], info["sizes"]["val"], info["sizes"]["test"], protocol,
                len(skipped), len(failed), stats["n_built"], stats["build_seconds"], stats["n_from_cache"])
    return DatasetSplits(datasets["train"], datasets["val"], datasets["test"], info)


def _target_key(src: _Source, source: str, target: Optional[str]):
    if src.name in TARGETS:
        if target is None:
            raise ValueError(f"{source}: choose a target: {', '.join(TARGETS[src.name])}")
        key = resolve_target(src.name, target)
        t = TARGETS[src.name][key]
        return key, t.unit, t
    # user data
    if target is None:
        cands = src.target_keys
        if src.name == "folder":
            return "target", "", None
        numeric = [c for c in cands if any(_to_float(e.values.get(c)) is not None for e in src.entries[:50])]
        if len(numeric) != 1:
            raise ValueError(f"{src.label}: choose a target among {numeric or cands}")
        return numeric[0], "", None
    target = str(target)
    if src.name == "folder" and target not in src.target_keys:
        if len(src.target_keys) == 2:  # one value column: any name means it
            return "target", "", None
        raise ValueError(f"{src.label}: id_prop.csv targets are 'target' (first value column) or column indices {src.target_keys[1:]}")
    if src.name != "folder" and src.entries and not any(target in e.values for e in src.entries[:1000]):
        raise ValueError(f"{src.label}: no target column/key {target!r}; available: {src.target_keys}")
    return target, "", None


def _maybe_log10(src: _Source, key: str, usable: List[Tuple[_Entry, float]]) -> Optional[str]:
    """jarvis "megnet" bulk/shear moduli: take log10 if the file holds GPa rather than log10(GPa)."""
    if src.name != "megnet" or key not in ("bulk modulus", "shear modulus") or not usable:
        return None
    median = float(np.median([y for _, y in usable]))
    if median > 10.0:  # log10 of realistic moduli is < 3; a median above 10 can only be GPa
        note = f"'{key}' values look like GPa (median {median:.3g}); using log10 of the positive ones"
        logger.info("megnet: %s", note)
        return note
    return None


def _assign_splits(src: _Source, source: str, key: str, tinfo: Optional[TargetInfo], usable, split: str, seed: int):
    """(protocol name, [split label or None per usable entry])."""
    split = (split or "auto").lower()
    if split not in ("auto", "paper", "random", "leaderboard", "column"):
        raise ValueError(f"split must be auto, paper, leaderboard or column, got {split!r}")
    if split == "random":
        split = "paper"
    n = len(usable)

    if src.name == "megnet_sample":
        split_targets = src.extra.get("split_targets", [])
        if split in ("auto", "leaderboard") and key in split_targets:
            labels = [_norm_split(e.split_by_target.get(key)) for e, _ in usable]
            if all(lb is not None for lb in labels):
                return "leaderboard", labels
        if split == "leaderboard":
            raise ValueError(f"megnet_sample: the JARVIS-Leaderboard has no split for {key!r} (only {split_targets}); use split='paper'")
        split = "paper"

    if split == "auto":
        split = "column" if src.extra.get("has_split_column") else "paper"

    if split == "column":
        labels = [e.split for e, _ in usable]
        if src.name not in ("csv", "json") or all(lb is None for lb in labels):
            raise ValueError(f"{src.label}: split='column' needs a 'split' column with train/val/test values")
        bad = sum(1 for lb in labels if lb is None)
        if bad:
            logger.warning("%s: %d entries have no recognised split value (train/val/test) and are left out", src.label, bad)
        return "column", labels

    if split == "leaderboard":
        task = tinfo.leaderboard_task if tinfo else None
        membership = leaderboard_membership(task) if task else None
        if membership is not None:
            labels = [membership.get(e.id) for e, _ in usable]
            missing = sum(1 for lb in labels if lb is None)
            n_lb = len(membership)
            found = n - missing
            logger.info("%s: JARVIS-Leaderboard task %s: %d of its %d ids found in the data; %d usable entries not in it",
                        src.label, task, found, n_lb, missing)
            return f"leaderboard ({task})", labels
        labels = [e.split for e, _ in usable]
        if any(lb is not None for lb in labels):
            return "leaderboard (records' leaderboard_split)", labels
        raise ValueError(f"{src.label}: split='leaderboard' needs the jarvis_leaderboard package "
                         f"(pip install jarvis-leaderboard==2024.10.30){' with task ' + task if task else ''} "
                         "or records with a 'leaderboard_split' field")

    # paper protocol
    sizes = None
    if src.name == "megnet" and key in _MEGNET_JOINT:
        if n >= sum(MEGNET_FIXED_SIZES):
            sizes = MEGNET_FIXED_SIZES
        else:
            logger.warning("megnet: %d usable entries < %d: using 80/10/10 instead of the reference's fixed 60000/5000/4239",
                           n, sum(MEGNET_FIXED_SIZES))
    train, val, test = paper_split(n, seed, sizes)
    labels: List[Optional[str]] = [None] * n
    for name, idx in (("train", train), ("val", val), ("test", test)):
        for i in idx:
            labels[i] = name
    return f"paper (seed {seed}, {'/'.join(map(str, paper_split_sizes(n, sizes)))})", labels


__all__ = [
    "CACHE_ENV",
    "CHUNK_SIZE",
    "CrystalGraphDataset",
    "DatasetSplits",
    "GRAPH_FORMAT_VERSION",
    "GraphCache",
    "JARVIS_FILES",
    "OFFLINE_ENV",
    "SAMPLE_PATH",
    "TARGETS",
    "TARGET_ALIASES",
    "TARGET_UNITS",
    "collate",
    "default_cache_dir",
    "leaderboard_membership",
    "load_dataset",
    "paper_split",
    "paper_split_sizes",
    "resolve_target",
    "target_unit",
]
