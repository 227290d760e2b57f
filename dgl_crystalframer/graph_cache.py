"""The on-disk graph cache, and building the graphs of a dataset's entries through it.

Graphs are cached under ``cache_dir`` (default ``$DGL_CRYSTALFRAMER_CACHE`` or
``~/.cache/dgl_crystalframer``), one folder per source, cutoff and graph format, in chunks of
``CHUNK_SIZE`` graphs: an interrupted build keeps every finished chunk and resumes there, and a
corrupt or stale chunk is deleted and rebuilt (``GraphCache``).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import time
import uuid
import warnings
from typing import Any, Dict, List, Optional, Tuple

from ._dgl import dgl
from .errors import StructureError
from .graph import build_graph
from .sources import Entry, Source

logger = logging.getLogger(__name__)

# Bump when the graph content for the same input changes.
GRAPH_FORMAT_VERSION = 2  # 2: ndata lattice_frame / lattice_tied
CACHE_ENV = "DGL_CRYSTALFRAMER_CACHE"
CHUNK_SIZE = 1000  # graphs per cache file: an interrupted build keeps every finished chunk


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
        if sha256_file(binpath) != info["sha256"]:
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
            info["sha256"] = sha256_file(tmp)
            os.replace(tmp, binpath)
        manifest = os.path.join(self.folder, f"chunk-{tag}.json")
        tmp = manifest + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(info, fh)
        os.replace(tmp, manifest)


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
    meta = {"source": src.identity, "cutoff": round(float(cutoff), 6), "graph_format": _graph_version()}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:20]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.label)[:40] or "data"
    return GraphCache(os.path.join(cache_dir or default_cache_dir(), f"{label}-{key}"), key, meta)


def build_graphs(entries: List[Entry], cutoff: float, cache: Optional[GraphCache], progress: bool, desc: str):
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
                except StructureError as exc:  # a property of the entry: cached, not tried again
                    failed[e.id] = buf_failed[e.id] = str(exc)
                except Exception as exc:  # unexpected: skip the entry this time, say why, retry next time
                    failed[e.id] = f"{e.id}: {type(exc).__name__}: {exc}"
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


__all__ = ["CACHE_ENV", "CHUNK_SIZE", "GRAPH_FORMAT_VERSION", "GraphCache", "build_graphs", "cache_for",
           "default_cache_dir"]
