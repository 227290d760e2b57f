"""How memory, disk and speed grow with the dataset: synthetic datasets made from the embedded
sample's structures (random strains, supercells, substitutions), from thousands of crystals to
hundreds of thousands.

    dgl-crystalframer scaling                                  # 20k, 100k, 200k crystals (also python -m benchmarks.scaling)
    dgl-crystalframer scaling --sizes 5000,20000 --memory-max 20000 --out runs/scaling

Graph building is measured on ``--build N`` synthetic crystals with 1 and 2 processes; the larger
datasets repeat those graphs' records on disk (building 200k graphs would take most of an hour and
measure nothing new).  For each size, a fresh training process (the default model, batch 32,
``--steps`` optimiser steps, evaluation capped) reports its peak RSS and training crystals/s,
once with the graphs out of core (``store``: what training uses now) and, up to ``--memory-max``
crystals, with every graph in memory (``memory``: what it used before).  With ``--workers 2``
the proportional set size (PSS) of the DataLoader workers is added; with ``--ddp 2`` the
out-of-core run is repeated as two gloo ranks under torchrun (peak RSS of each rank).  Prints a table, projects the
named datasets from the measured slopes, writes OUT/scaling.json and OUT/rss_vs_size.png.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

SUBSTITUTES = ("Li", "Na", "K", "Mg", "Ca", "Sr", "Al", "Ga", "Si", "Ge", "Ti", "Zr", "Fe", "Co", "Ni", "Cu", "Zn",
               "O", "S", "Se", "F", "Cl", "Br", "N", "P")
PROJECT = {"dft_3d_2021": 55723, "megnet": 69239, "oqmd_3d": 817636}


def synthetic_structures(n: int, seed: int = 0) -> List[Dict[str, Any]]:
    """``n`` jarvis-style atoms dicts: sample structures, strained, sometimes doubled, sometimes substituted."""
    from ..sources import SAMPLE_PATH

    entries = [e for e in json.loads(gzip.decompress(Path(SAMPLE_PATH).read_bytes()))["entries"]
               if all(isinstance(s, str) for s in e["species"]) and len(e["species"]) <= 24]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        e = entries[int(rng.integers(len(entries)))]
        lattice = np.asarray(e["lattice"], float)
        strain = rng.normal(0.0, 0.02, (3, 3))
        lattice = lattice @ (np.eye(3) + 0.5 * (strain + strain.T))
        frac, species = np.asarray(e["frac_coords"], float), list(e["species"])
        if rng.random() < 0.2:  # a 2x supercell along one axis
            axis = int(rng.integers(3))
            shift = np.zeros(3)
            shift[axis] = 1.0
            frac = np.concatenate([frac, frac + shift])
            frac[:, axis] /= 2.0
            lattice[axis] *= 2.0
            species = species * 2
        if rng.random() < 0.5:  # one element replaced by another
            old = species[int(rng.integers(len(species)))]
            new = SUBSTITUTES[int(rng.integers(len(SUBSTITUTES)))]
            species = [new if s == old else s for s in species]
        out.append({"lattice_mat": lattice.tolist(), "coords": frac.tolist(), "elements": species, "cartesian": False})
    return out


def _cache(folder: str):
    from ..graph_cache import GraphCache

    return GraphCache(folder, "scaling", {})


def stored_refs(folder: str) -> list:
    """The references of a folder written by ``_build`` or ``write_dataset``, in id order (the
    graph cache's own loader, checksums included)."""
    refs, _ = _cache(folder).load()
    return [refs[k] for k in sorted(refs, key=int)]


def _build(structures, workers: int, folder: str) -> float:
    """Seconds per crystal to build and store ``structures`` with ``workers`` processes."""
    from ..graph_cache import build_graphs
    from ..sources import Entry

    entries = [Entry(str(k), (lambda s=s: s), {}) for k, s in enumerate(structures)]
    t0 = time.perf_counter()
    build_graphs(entries, None, _cache(folder), False, "scaling", workers)
    return (time.perf_counter() - t0) / len(structures)


def write_dataset(folder: str, graphs: List[Any], n: int, chunk: int = 1000) -> int:
    """A graph-cache folder of ``n`` crystals cycling through ``graphs``; returns its size in bytes."""
    cache = _cache(folder)
    for lo in range(0, n, chunk):
        ids = [str(k) for k in range(lo, min(lo + chunk, n))]
        cache.add(ids, [graphs[int(i) % len(graphs)] for i in ids], {})
    return sum(r.size for r in stored_refs(folder))


def _pss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return None


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One training process on a written dataset (run in a fresh interpreter)."""
    import torch

    from ..config import TrainConfig
    from ..data import CrystalGraphDataset, DatasetSplits
    from ..graph_store import GraphList
    from ..training import train_and_evaluate

    refs = stored_refs(spec["folder"])
    graphs: Any = GraphList(refs)
    if spec["mode"] == "memory":  # every graph in memory, as datasets were before
        graphs = [graphs[k] for k in range(len(graphs))]
    n = len(refs)
    y = np.random.default_rng(0).normal(size=n).astype(np.float32)
    cut = [0, int(0.8 * n), int(0.9 * n), n]
    parts = [CrystalGraphDataset(graphs[a:b] if spec["mode"] == "memory" else GraphList(refs[a:b]), y[a:b],
                                 [str(k) for k in range(a, b)], "y", "") for a, b in zip(cut, cut[1:])]
    del refs
    data = DatasetSplits(*parts, {"target": "y", "unit": "", "split": "synthetic"})
    pss: Dict[int, int] = {}
    done = threading.Event()

    def sample_workers():  # DataLoader workers live while an epoch runs: sample their PSS meanwhile
        while not done.wait(0.5):
            for proc in multiprocessing.active_children():
                kib = _pss_kib(proc.pid)
                if kib is not None:
                    pss[proc.pid] = max(kib, pss.get(proc.pid, 0))

    cfg = TrainConfig(dataset="synthetic", target="y", preset="quick", time_budget=None, epochs=1, batch_size=32,
                      max_train=32 * spec["steps"], max_eval=64, out_dir=spec["out"], progress=False, plots=False,
                      threads=spec["threads"], num_workers=spec["workers"], seed=0, swa_epochs=0)

    sampler = threading.Thread(target=sample_workers, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = train_and_evaluate(cfg, data=data, started_at=t0)
    finally:
        done.set()
    return {"rank": int(os.environ.get("RANK", 0)), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "crystals_per_second": result["crystals_per_second"] or result["crystals_per_second_first_epoch"],
            "worker_pss_mib": [v / 1024.0 for v in pss.values()], "torch": torch.__version__}


def _run_child(spec: Dict[str, Any], ranks: int = 1) -> List[Dict[str, Any]]:
    """The child's report, one per rank (``ranks`` > 1: gloo ranks under torchrun)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 \
        else [sys.executable]
    out = subprocess.run(launch + ["-m", "dgl_crystalframer.bench.scaling", "--child", json.dumps(spec)],
                         capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed: {out.stderr.strip().splitlines()[-1:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def build_parser(prog: str = "dgl-crystalframer scaling") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="20000,100000,200000", help="dataset sizes (crystals) [default: %(default)s]")
    p.add_argument("--memory-max", type=int, default=20000,
                   help="largest size also measured with every graph in memory [default: %(default)s]")
    p.add_argument("--build", type=int, default=400, help="crystals built to time graph building [default: %(default)s]")
    p.add_argument("--steps", type=int, default=40, help="optimiser steps per training measurement [default: %(default)s]")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers in the training measurement [default: 0]")
    p.add_argument("--ddp", type=int, default=0, metavar="RANKS",
                   help="also train out of core as this many gloo ranks (torchrun) [default: 0, not measured]")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process [default: 1]")
    p.add_argument("--dir", help="where the synthetic datasets are written [default: a temporary folder, removed]")
    p.add_argument("--out", default="runs/scaling", help="scaling.json and the plot [default: %(default)s]")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p


def main(argv=None, prog: str = "dgl-crystalframer scaling") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    from .. import __version__
    from ..graph_store import read_graph

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        structures = synthetic_structures(args.build)
        build = {w: _build(structures, w, os.path.join(work, f"build{w}")) for w in (1, 2)}
        print(f"graph building: {1000 * build[1]:.1f} ms/crystal with 1 process, {1000 * build[2]:.1f} with 2 "
              f"({args.build} synthetic crystals)")
        refs = stored_refs(os.path.join(work, "build1"))
        base = [read_graph(r) for r in refs]
        bytes_per_crystal = float(np.mean([r.size for r in refs]))
        edges = float(np.mean([g.num_edges() for g in base]))
        rows = []
        for n in sizes:
            folder = os.path.join(work, f"n{n}")
            disk = write_dataset(folder, base, n)
            for mode, ranks in (("store", 1), ("memory", 1), ("ddp", args.ddp)):
                if (mode == "memory" and n > args.memory_max) or ranks < 1:
                    continue
                spec = {"folder": folder, "mode": mode, "steps": args.steps, "workers": args.workers,
                        "threads": args.threads, "out": os.path.join(work, f"run-{n}-{mode}")}
                for r in _run_child(spec, ranks):
                    rows.append({"crystals": n, "mode": mode, "disk_mib": disk / 2**20, **r})
                    who = f"{mode} rank {r['rank']}" if ranks > 1 else mode
                    print(f"{n:>8,d} crystals  {who:13s}  disk "
                          f"{disk / 2**20:8.1f} MiB  peak RSS {r['peak_rss_mib']:7.0f} MiB  training "
                          f"{r['crystals_per_second']:6.1f} crystals/s"
                          + (f"  worker PSS {', '.join(f'{v:.0f}' for v in r['worker_pss_mib'])} MiB"
                             if r["worker_pss_mib"] else ""))
            shutil.rmtree(folder, ignore_errors=True)
    report = {"version": __version__, "build_seconds_per_crystal": build, "mean_edges": edges,
              "disk_bytes_per_crystal": bytes_per_crystal, "rows": rows,
              "projection": project(rows, bytes_per_crystal, build[1])}
    for name, p in report["projection"].items():
        rss = [f"{p[f'rss_{m}_mib']:.0f} MiB {what}" for m, what in (("store", "out of core"), ("memory", "with graphs in memory"))
               if f"rss_{m}_mib" in p]  # a slope needs two sizes
        print(f"{name:12s} {p['crystals']:>8,d} crystals: disk {p['disk_gib']:.2f} GiB, build {p['build_hours_1_core']:.2f} h "
              "on one core" + (f", training RSS {', '.join(rss)}" if rss else ""))
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, out / "rss_vs_size.png")
    print(f"wrote {out / 'scaling.json'} and {out / 'rss_vs_size.png'}")
    return 0


def _fit(rows, mode):
    pts = [(r["crystals"], r["peak_rss_mib"]) for r in rows if r["mode"] == mode]
    if len(pts) < 2:
        return None
    x, y = np.array(pts, float).T
    slope, intercept = np.polyfit(x, y, 1)
    if slope < 0:  # no growth, within the noise: the largest measured value, not a falling line
        return 0.0, float(y.max())
    return slope, intercept


def project(rows, bytes_per_crystal: float, build_seconds: float) -> Dict[str, Dict[str, Any]]:
    """Disk, one-core build time and training RSS of the named datasets, from the measured slopes."""
    out = {}
    for name, n in PROJECT.items():
        p = {"crystals": n, "disk_gib": n * bytes_per_crystal / 2**30, "build_hours_1_core": n * build_seconds / 3600}
        for mode in ("store", "memory"):
            fit = _fit(rows, mode)
            if fit is not None:
                p[f"rss_{mode}_mib"] = fit[0] * n + fit[1]
        out[name] = p
    return out


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode, label in (("store", "graphs out of core (now)"), ("memory", "graphs in memory (before)"),
                        ("ddp", "out of core, each of the DDP ranks")):
        per_size: Dict[int, float] = {}
        for r in rows:
            if r["mode"] == mode:
                per_size[r["crystals"]] = max(r["peak_rss_mib"], per_size.get(r["crystals"], 0.0))
        if per_size:
            ax.plot(*zip(*sorted(per_size.items())), "o-", label=label)
    ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
    ax.set_xlabel("crystals in the dataset")
    ax.set_ylabel("peak RSS of training (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
