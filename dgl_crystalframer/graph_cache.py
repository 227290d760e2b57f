"""The on-disk graph cache, and building the graphs of a dataset's entries through it.

Graphs are cached under ``cache_dir`` (default ``$DGL_CRYSTALFRAMER_CACHE`` or
``~/.cache/dgl_crystalframer``), one folder per source, cutoff and graph format, in chunks of at
most ``CHUNK_SIZE`` graphs stored as flat records (``graph_store.py``): loading the cache returns
references, and a graph is read from disk when a batch needs it, so memory does not grow with the
dataset.  An interrupted build keeps every finished chunk and resumes there, a corrupt or stale
chunk is deleted and rebuilt (``GraphCache``), several processes (DDP ranks, concurrent runs)
build a folder once (a lock), and ``workers`` processes build in parallel.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple

from .errors import StructureError
from .graph import build_graph
from .graph_store import GraphRef, forget_files, write_records
from .sources import Entry, Source

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent builds then each build their own chunks
    fcntl = None

logger = logging.getLogger(__name__)

# Bump when the graph content for the same input changes.
GRAPH_FORMAT_VERSION = 3  # 2: ndata lattice_frame / lattice_tied; 3: flat records (graph_store.py)
CACHE_ENV = "DGL_CRYSTALFRAMER_CACHE"
CHUNK_SIZE = 1000  # graphs per cache file: an interrupted build keeps every finished chunk


class GraphCache:
    """Chunked, id-keyed, self-checking cache of built graphs in one folder.

    Each chunk is ``chunk-<tag>.bin`` (``graph_store.write_records``) plus ``chunk-<tag>.json`` (ids,
    each record's offset, size and atoms, failed ids with reasons, the .bin's size and sha256, the
    cache key).  Both are written to
    a temporary file and ``os.replace``d (the .json last), so a chunk is either complete or
    ignored.  On load, a chunk whose json does not parse, whose key differs, whose .bin is
    missing, has another size or sha256, or whose index does not fit the file is logged, deleted
    and its entries rebuilt.  Chunks are added as building proceeds, so an
    interrupted build resumes where it stopped.
    """

    def __init__(self, folder: str, key: str, meta: Dict[str, Any]):
        self.folder = folder
        self.key = key
        self.meta = meta

    def load(self, wanted: Optional[set] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
        """({id: GraphRef}, {id: failure reason}) of all valid chunks (only chunks holding a ``wanted`` id)."""
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
        if sha256_file(binpath) != info["sha256"]:
            raise ValueError("graph file checksum mismatch")
        index = info["index"]
        if len(index) != len(ids):
            raise ValueError(f"{len(index)} records for {len(ids)} ids")
        end = 0
        for offset, size, _ in index:
            if offset != end:
                raise ValueError("record index does not fit the file")
            end = offset + size
        if end != info["size"]:
            raise ValueError("record index does not fit the file")
        return {i: GraphRef(binpath, *rec) for i, rec in zip(ids, index)}, failed

    def _remove_chunk(self, manifest: str) -> None:
        forget_files()
        for p in (manifest, manifest[: -len(".json")] + ".bin"):
            with contextlib.suppress(OSError):
                os.remove(p)

    @contextlib.contextmanager
    def build_lock(self):
        """Held while building: a second process (another DDP rank, a concurrent run) waits, then
        finds the graphs built (advisory ``flock``; a no-op where the file system has none)."""
        try:
            os.makedirs(self.folder, exist_ok=True)
            fh = open(os.path.join(self.folder, ".build.lock"), "a+")
        except OSError:  # an unwritable cache: building goes on without it (``add`` says so)
            yield
            return
        with fh:
            with contextlib.suppress(OSError, AttributeError):
                fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, AttributeError):
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def add(self, ids: List[str], graphs: List[Any], failed: Dict[str, str]) -> Dict[str, GraphRef]:
        """Store a chunk; returns the stored graphs' references."""
        if not ids and not failed:
            return {}
        os.makedirs(self.folder, exist_ok=True)
        tag = f"{time.time_ns():x}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        info: Dict[str, Any] = {"key": self.key, "meta": self.meta, "ids": ids, "failed": failed, "bin": f"chunk-{tag}.bin"}
        if ids:
            binpath = os.path.join(self.folder, info["bin"])
            tmp = binpath + ".tmp"
            info["index"] = write_records(tmp, graphs)
            info["size"] = os.path.getsize(tmp)
            info["sha256"] = sha256_file(tmp)
            os.replace(tmp, binpath)
        manifest = os.path.join(self.folder, f"chunk-{tag}.json")
        tmp = manifest + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(tmp, manifest)
        binpath = os.path.join(self.folder, info["bin"])
        return {i: GraphRef(binpath, *rec) for i, rec in zip(ids, info.get("index", []))}


def sha256_file(path: str) -> str:
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


def cache_for(src: Source, cutoff: float, cache_dir: Optional[str]) -> GraphCache:
    """The cache folder of this source's graphs at this cutoff and graph format."""
    return cache_of(src.label, src.identity, cutoff, cache_dir)


def cache_of(label: str, identity: Dict[str, Any], cutoff: float, cache_dir: Optional[str]) -> GraphCache:
    """``cache_for`` from a source's label and identity alone (``sources.jarvis_identity``)."""
    meta = {"source": identity, "cutoff": round(float(cutoff), 6), "graph_format": _graph_version()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:20]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40] or "data"
    return GraphCache(os.path.join(cache_dir or default_cache_dir(), f"{label}-{key}"), key, meta)


def default_build_workers() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


PARALLEL_MIN = 200  # fewer graphs to build than this: one process (a pool costs more than it saves)


def build_graphs(entries: List[Entry], cutoff: float, cache: Optional[GraphCache], progress: bool, desc: str,
                 workers: Optional[int] = None):
    """{id: graph or GraphRef}, {id: reason}, stats; cached graphs are reused, new ones are built and stored.

    With a cache, graphs come back as ``GraphRef``s (read when used); without one, as graphs.
    ``workers`` processes build (None: the cores; 1: this process).  The cache folder's lock is
    held while building, so a second process waits and then reads what the first built.
    """
    wanted = {e.id for e in entries}
    graphs, failed = cache.load(wanted) if cache is not None else ({}, {})
    todo = [e for e in entries if e.id not in graphs and e.id not in failed]
    t0 = time.perf_counter()
    if todo and cache is not None:
        with cache.build_lock():
            graphs, failed = cache.load(wanted)  # another process may have built them meanwhile
            todo = [e for e in entries if e.id not in graphs and e.id not in failed]
            _build(todo, cutoff, cache, progress, desc, workers, graphs, failed)
    elif todo:
        _build(todo, cutoff, None, progress, desc, workers, graphs, failed)
    from_cache = len(wanted) - len(todo)
    return graphs, failed, {"n_built": len(todo), "n_from_cache": from_cache, "build_seconds": time.perf_counter() - t0}


def _build(todo: List[Entry], cutoff: float, cache: Optional[GraphCache], progress: bool, desc: str,
           workers: Optional[int], graphs: Dict[str, Any], failed: Dict[str, str]) -> None:
    from tqdm.auto import tqdm

    workers = default_build_workers() if workers is None else max(1, int(workers))
    parallel = workers > 1 and len(todo) >= PARALLEL_MIN and "fork" in multiprocessing.get_all_start_methods()
    # slices small enough to spread the work and show progress, never above a chunk
    size = min(CHUNK_SIZE, max(1, math.ceil(len(todo) / (4 * workers)))) if parallel else CHUNK_SIZE
    slices = [(lo, min(lo + size, len(todo))) for lo in range(0, len(todo), size)]
    bar = tqdm(total=len(todo), desc=f"building graphs ({desc}{f', {workers} processes' if parallel else ''})",
               unit="crystal", disable=not progress, mininterval=1.0)
    state = {"cache": cache}
    try:
        if parallel:
            slices = _build_parallel(todo, cutoff, cache, workers, slices, bar, graphs, failed)
        for lo, hi in slices:  # one process (or what a failed pool left)
            built, bad = _build_entries(todo[lo:hi], cutoff, state, bar)
            graphs.update(built), failed.update(bad)
    finally:  # also on Ctrl-C: every finished slice is in the cache already
        _WORK.clear()
        bar.close()


_WORK: Dict[str, Any] = {}  # what forked build workers read


def _build_parallel(todo, cutoff, cache, workers, slices, bar, graphs, failed) -> List[Tuple[int, int]]:
    """Build ``slices`` in forked worker processes; returns the slices left undone if a worker died
    (a pool whose worker dies fails at once here, where ``multiprocessing.Pool`` would wait forever)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    _WORK.update(todo=todo, cutoff=cutoff, cache=cache)
    done = set()
    ctx = multiprocessing.get_context("fork")  # workers inherit the entries (their readers are closures)
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(_build_slice, sl): sl for sl in slices}
            for future in as_completed(futures):
                built, bad, n = future.result()
                graphs.update(built), failed.update(bad), bar.update(n)
                done.add(futures[future])
    except BrokenProcessPool as exc:
        left = [sl for sl in slices if sl not in done]
        logger.warning("graph building: a worker process died (%s); building the %d remaining crystals in this process",
                       exc, sum(hi - lo for lo, hi in left))
        return left
    return []


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already


def _build_slice(bounds: Tuple[int, int]):
    lo, hi = bounds
    state = {"cache": _WORK["cache"]}
    built, bad = _build_entries(_WORK["todo"][lo:hi], _WORK["cutoff"], state, None)
    return built, bad, hi - lo


def _build_entries(entries: List[Entry], cutoff: float, state: Dict[str, Any], bar) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Build, store as one chunk (``state["cache"]``, dropped if unwritable); ({id: ref or graph}, {id: reason})."""
    ids: List[str] = []
    built: List[Any] = []
    failed: Dict[str, str] = {}
    keep: Dict[str, str] = {}  # failures worth caching (a property of the entry, not of this run)
    try:
        for e in entries:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    g = build_graph(e.make(), cutoff=cutoff, entry_id=e.id)
            except StructureError as exc:  # a property of the entry: cached, not tried again
                failed[e.id] = keep[e.id] = str(exc)
            except Exception as exc:  # unexpected: skip the entry this time, say why, retry next time
                failed[e.id] = f"{e.id}: {type(exc).__name__}: {exc}"
            else:
                ids.append(e.id)
                built.append(g)
            if bar is not None:
                bar.update(1)
    finally:  # also on Ctrl-C: keep what was built
        graphs: Dict[str, Any] = dict(zip(ids, built))
        if state["cache"] is not None and (ids or keep):
            try:
                graphs = dict(graphs, **state["cache"].add(ids, built, keep))
            except OSError as exc:  # unwritable / full disk: go on without caching
                logger.warning("graph cache: cannot write to %s (%s); continuing without caching", state["cache"].folder, exc)
                state["cache"] = None
    return graphs, failed


__all__ = ["CACHE_ENV", "CHUNK_SIZE", "GRAPH_FORMAT_VERSION", "GraphCache", "build_graphs", "cache_for", "cache_of",
           "default_build_workers", "default_cache_dir"]
