"""Sources: where a dataset's entries come from, each entry an id, a way to get its structure,
its raw target values and, where the source gives one, a split label.

* a named dataset (``datasets.DATASETS``): the real-data sample embedded in the package
  (``megnet_sample``, ``sample/README.md``), or a jarvis-tools dataset (``dft_3d_2021``, ``megnet``,
  ``oqmd_3d``), read with ``jarvis.db.figshare.data(name, store_dir=data_dir)``.  The file is
  looked for first; when it is absent and cannot be downloaded the error says which file to put where.
* a path: a CSV (id column + structure text or file path column + target columns, optionally a
  ``split`` column), a folder with ``id_prop.csv`` (ALIGNN/CGCNN convention) and structure files,
  or a JSON / JSON.zip list of jarvis-style records (``atoms`` dict + target keys).
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import threading
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .errors import DataError, StructureError
from .datasets import DATASETS, DatasetSpec, JarvisFile, dataset_spec
from .structures import parse_structure_text, read_structure_file, structure_from_record
from .targets import to_float

logger = logging.getLogger(__name__)

OFFLINE_ENV = "DGL_CRYSTALFRAMER_OFFLINE"  # "1": never try to download (jarvis sources fail fast)
SAMPLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample", "megnet_sample.json.gz")
SPLITS = ("train", "val", "test")

_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test", "testing": "test"}


def norm_split(value: Any) -> Optional[str]:
    """train / val / test for the usual spellings of a split label, else None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return _SPLIT_NAMES.get(str(value).strip().lower())


@dataclass
class Entry:
    id: str
    make: Callable[[], Any]  # -> what build_graph accepts (may raise StructureError)
    values: Dict[str, Any]  # raw target values by key
    split: Optional[str] = None  # a given split label (leaderboard / CSV column)
    split_by_target: Dict[str, Any] = field(default_factory=dict)  # megnet_sample: leaderboard membership per target


@dataclass
class Source:
    name: str  # a named dataset (datasets.DATASETS), or "csv", "folder", "json"
    label: str  # for messages and the cache folder name
    identity: Dict[str, Any]  # what the graph cache is keyed on
    entries: List[Entry]
    target_keys: List[str] = field(default_factory=list)  # available targets
    extra: Dict[str, Any] = field(default_factory=dict)


def _file_identity(path: str) -> Dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sample_source(path: str = SAMPLE_PATH) -> Source:
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

        entries.append(Entry(e["id"], make, dict(e["targets"]), None, dict(e.get("split") or {})))
    return Source("megnet_sample", "megnet_sample", {"sample_sha256": hashlib.sha256(raw).hexdigest()}, entries,
                   list(DATASETS["megnet_sample"].targets), {"split_targets": doc.get("split_targets", [])})


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


def _jarvis_file(jf: JarvisFile) -> Tuple[str, str]:
    """(url, json member name) as the installed jarvis-tools knows them; the spec's as fallback."""
    url, js_tag = jf.url, jf.member
    try:
        from jarvis.db.figshare import get_db_info

        info = get_db_info().get(jf.name)
        if info and str(info[1]).endswith(".json"):
            url, js_tag = str(info[0]), str(info[1])
    except Exception:  # old/new jarvis-tools without get_db_info: keep the table
        pass
    return url, js_tag


def jarvis_identity(spec: DatasetSpec, data_dir: Optional[str]) -> Optional[Dict[str, Any]]:
    """The identity ``open_source`` gives a jarvis-tools dataset (what the graph cache is keyed on),
    from the file's size and time, without reading it; None while the file is absent."""
    path = os.path.join(_jarvis_store_dir(data_dir), _jarvis_file(spec.jarvis)[1] + ".zip")
    return {"dataset": spec.name, **_file_identity(path)} if os.path.isfile(path) else None


def _jarvis_records(spec: DatasetSpec, data_dir: Optional[str]) -> Tuple[List[Dict[str, Any]], str]:
    dataset = spec.name
    url, js_tag = _jarvis_file(spec.jarvis)
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
            records = jarvis_data(spec.jarvis.name, store_dir=store)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise DataError(f"{dataset}: cannot read {path} ({type(exc).__name__}: {exc}); the file is damaged or "
                           f"incomplete: delete it and download {url} again") from exc
    for line in out.getvalue().splitlines():
        logger.debug("jarvis-tools: %s", line)
    return records, path


def _jarvis_source(spec: DatasetSpec, data_dir: Optional[str]) -> Source:
    records, path = _jarvis_records(spec, data_dir)
    dataset, id_key = spec.name, spec.jarvis.id_key
    entries = []
    for k, rec in enumerate(records):
        rid = str(rec.get(id_key, rec.get("jid", rec.get("id", k))))
        entries.append(Entry(rid, (lambda rec=rec, rid=rid: structure_from_record(rec, rid)), rec, norm_split(rec.get("leaderboard_split"))))
    return Source(dataset, dataset, {"dataset": dataset, **_file_identity(path)}, entries, list(spec.targets), {"path": path})


def _csv_source(path: str) -> Source:
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    cols = {c.lower().strip(): c for c in df.columns}
    id_col = next((cols[c] for c in ("id", "jid", "material_id", "mpid", "name") if c in cols), df.columns[0])
    struct_col = next((cols[c] for c in ("structure", "cif", "poscar", "atoms") if c in cols), None)
    path_col = next((cols[c] for c in ("path", "file", "filepath", "file_path", "filename", "structure_path", "structure_file") if c in cols), None)
    if struct_col is None and path_col is None:
        raise DataError(f"{path}: need a structure column (CIF or POSCAR text: structure/cif/poscar) or a path column "
                         f"(path/file/filename); columns are {list(df.columns)}")
    split_col = cols.get("split")
    base = os.path.dirname(os.path.abspath(path))
    identity = {"csv": _file_identity(path)}
    entries = []
    file_stats = []
    for _, row in df.iterrows():
        rid = str(row[id_col])
        if struct_col is not None and str(row[struct_col]).strip():
            make = (lambda text=str(row[struct_col]), rid=rid: parse_structure_text(text, rid))
        elif path_col is not None:
            fpath = os.path.join(base, os.path.expanduser(str(row[path_col])))
            make = (lambda fpath=fpath, rid=rid: read_structure_file(fpath, rid))
            try:
                st = os.stat(fpath)
                file_stats.append((fpath, st.st_size, st.st_mtime_ns))
            except OSError:
                file_stats.append((fpath, None, None))
        else:
            make = (lambda rid=rid: _no_structure(rid))
        values = {c: row[c] for c in df.columns if c not in (id_col, struct_col, path_col, split_col)}
        entries.append(Entry(rid, make, values, norm_split(row[split_col]) if split_col else None))
    if file_stats:
        identity["files"] = hashlib.sha256(json.dumps(file_stats).encode()).hexdigest()
    targets = [c for c in df.columns if c not in (id_col, struct_col, path_col, split_col)]
    return Source("csv", os.path.splitext(os.path.basename(path))[0], identity, entries, targets, {"has_split_column": split_col is not None})


def _no_structure(rid: str):
    raise StructureError(f"{rid}: empty structure cell")


def _folder_source(folder: str) -> Source:
    import pandas as pd

    id_prop = os.path.join(folder, "id_prop.csv")
    df = pd.read_csv(id_prop, header=None, dtype=str, keep_default_na=False, skipinitialspace=True)
    if df.shape[1] < 2:  # some id_prop files are whitespace separated
        df = pd.read_csv(id_prop, header=None, dtype=str, keep_default_na=False, sep=r"\s+")
    if df.shape[1] < 2:
        raise DataError(f"{id_prop}: expected 'filename,target' rows (no header)")
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
        entries.append(Entry(name, (lambda fpath=fpath, name=name: read_structure_file(fpath, name)), values))
    identity = {"id_prop": _file_identity(id_prop), "files": hashlib.sha256(json.dumps(file_stats).encode()).hexdigest()}
    return Source("folder", os.path.basename(os.path.abspath(folder)), identity, entries, ["target"] + [str(k) for k in range(n_targets)])


def _json_source(path: str) -> Source:
    if path.lower().endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith(".json")] or zf.namelist()
            if len(members) != 1:
                raise DataError(f"{path}: expected one JSON member, found {members}")
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
        raise DataError(f"{path}: expected a JSON list of records")
    entries = []
    for k, rec in enumerate(records):
        rid = str(next((rec[key] for key in ("jid", "id", "material_id") if key in rec), k))
        split = norm_split(rec.get("split")) or norm_split(rec.get("leaderboard_split"))
        entries.append(Entry(rid, (lambda rec=rec, rid=rid: structure_from_record(rec, rid)), rec, split))
    keys = sorted({k for rec in records[:100] for k, v in rec.items() if to_float(v) is not None})
    name = os.path.basename(path)
    for ext in (".zip", ".gz", ".json"):
        name = name[: -len(ext)] if name.lower().endswith(ext) else name
    return Source("json", name, {"json": _file_identity(path)}, entries, keys,
                   {"has_split_column": any(norm_split(r.get("split")) for r in records[:1000] if isinstance(r, dict))})


def unique_ids(ids: Sequence[str]) -> Tuple[List[str], List[str]]:
    """Every id kept in place, repeats renamed id#2, id#3, ...; and the ids that repeated."""
    seen: Dict[str, int] = {}
    out, renamed = [], []
    for i in ids:
        k = seen[i] = seen.get(i, 0) + 1
        out.append(i if k == 1 else f"{i}#{k}")
        if k > 1:
            renamed.append(i)
    return out, renamed


def _dedupe_ids(src: Source) -> Source:
    """Keep every entry (split positions must not move) but make ids unique: id, id#2, id#3, ..."""
    ids, renamed = unique_ids([e.id for e in src.entries])
    for e, i in zip(src.entries, ids):
        e.id = i
    if renamed:
        logger.warning("%s: %d duplicate ids renamed to id#2, id#3, ... (first: %s)", src.label, len(renamed), ", ".join(renamed[:5]))
    return src


def open_source(source: str, data_dir: Optional[str] = None) -> Source:
    """The entries of a named dataset or a file/folder of the user's, ids made unique."""
    return _dedupe_ids(_open_source_raw(source, data_dir))


def _open_source_raw(source: str, data_dir: Optional[str]) -> Source:
    spec = dataset_spec(source)
    if spec is not None:
        return _sample_source() if spec.jarvis is None else _jarvis_source(spec, data_dir)
    path = os.path.expanduser(str(source))
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "id_prop.csv")):
            raise FileNotFoundError(f"{path}: a dataset folder needs an id_prop.csv (rows 'filename,target', no header)")
        return _read(_folder_source, path)
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".csv"):
            return _read(_csv_source, path)
        if low.endswith((".json", ".zip", ".gz")):
            return _read(_json_source, path)
        raise DataError(f"{path}: unsupported file type (use .csv, .json, .json.zip or a folder with id_prop.csv)")
    if source == "dft_3d":
        raise DataError("'dft_3d' points to newer, larger JARVIS snapshots; the paper uses 'dft_3d_2021'")
    raise DataError(f"unknown dataset {source!r}: use {', '.join(DATASETS)}, or a path to a CSV, "
                    "a JSON/JSON.zip list of records, or a folder with id_prop.csv")


def _read(reader: Callable[[str], Source], path: str) -> Source:
    """Run a file reader; a malformed file (pandas, json, zip or decoding errors) is one DataError."""
    try:
        return reader(path)
    except (DataError, FileNotFoundError):
        raise
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise DataError(f"{path}: cannot read it ({type(exc).__name__}: {first_line})") from exc


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


__all__ = ["Entry", "OFFLINE_ENV", "jarvis_identity", "unique_ids", "SAMPLE_PATH", "SPLITS", "Source", "leaderboard_membership",
           "norm_split", "open_source"]
