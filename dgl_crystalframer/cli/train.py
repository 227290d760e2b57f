"""``dgl-crystalframer train``: train and evaluate, print a table of the results.

    dgl-crystalframer train                                   # embedded MP sample, e_form, frame max, preset quick
    dgl-crystalframer train --frame all                       # every frame type on one split
    dgl-crystalframer train --dataset dft_3d_2021 --data-dir DIR --preset paper
    torchrun --nproc_per_node 4 -m dgl_crystalframer train --dataset megnet --preset paper --device cuda

Each run writes OUT/results.json, OUT/log.csv, OUT/split_ids.json, OUT/parity.png,
OUT/learning_curve.png and the checkpoints OUT/model.pt (the reported model), OUT/best.pt,
OUT/swa.pt and OUT/last.pt (OUT defaults to runs/<dataset>-<target>-<frame>).  ``python -m benchmarks.jarvis`` is this command with the
published test MAEs next to ours.  Exit status: 0 ok, 2 bad options or data (one message, no
traceback), 130 interrupted (rerun with --resume to continue from the last completed epoch).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..config import (BACKENDS, FRAMES, FRAME_TYPES, MODEL_PRESETS, SCHEDULES, TRAIN_PRESETS, TrainConfig,
                      default_out_dir, read_config_file)
from ..datasets import DATASETS, DEFAULT_DATASET
from ..errors import ConfigError

FRAME_LABELS = {f.name: f.label for f in FRAMES.values()}


def build_parser(prog: str = "dgl-crystalframer train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train and evaluate CrystalFramer. Without arguments: the embedded Materials Project sample "
                    "(formation energy, official split membership), frame max, preset quick (minutes on a laptop).",
        epilog="Precedence: TrainConfig defaults < preset < --config FILE < command-line flags.",
    )
    p.add_argument("--dataset", help=f"{', '.join(DATASETS)}, or a path to your own dataset (CSV, folder "
                                     f"with id_prop.csv, JSON/JSON.zip) [default: {DEFAULT_DATASET}]")
    p.add_argument("--target", help="target key, e.g. e_form, gap_pbe, formation_energy_peratom, mbj_bandgap "
                                    "[default: the dataset's formation energy]")
    p.add_argument("--frame", choices=FRAME_TYPES + ("all",), help="frame type, or 'all' for the ablation [default: max]")
    p.add_argument("--layers", type=int, dest="num_layers", help="number of attention blocks [default: 4]")
    p.add_argument("--model", dest="model_preset", choices=tuple(MODEL_PRESETS),
                   help="the paper's models: crystalformer (no frames, 853K parameters), default (max frames, "
                        "D=64, 952K), lightweight (max frames, D=16, 878K); --frame, --layers override it [default: "
                        "default]")
    p.add_argument("--init-from", dest="init_from", metavar="CHECKPOINT",
                   help="fine-tune: start from this checkpoint's weights (its architecture and graph cutoff; a "
                        "conflicting model flag is an error); the target normaliser is fitted anew")
    p.add_argument("--freeze-blocks", dest="freeze_blocks", type=int, metavar="N",
                   help="with --init-from: keep the species embedding and the first N attention blocks as loaded "
                        "[default: 0, all train]")
    p.add_argument("--preset", choices=tuple(TRAIN_PRESETS),
                   help="smoke (seconds), quick (minutes), paper (the paper's epochs and batch sizes, "
                        "docs/METHOD.md 5) [default: quick]")
    p.add_argument("--time-budget", dest="time_budget", metavar="DURATION",
                   help="train for this long, all included (data, graphs, evaluation), e.g. 10m, 2h: the run measures "
                        "its speed and plans the steps that fit (with the cosine schedule, unless --schedule says "
                        "otherwise, annealed to zero by the end)")
    p.add_argument("--schedule", choices=SCHEDULES,
                   help="learning rate: paper (lr0 sqrt(T/(T+t)), docs/METHOD.md 5) or cosine (annealed to zero) "
                        "[default: the preset's: cosine for smoke/quick, paper for paper]")
    p.add_argument("--epochs", type=int)
    p.add_argument("--swa-epochs", type=int, dest="swa_epochs",
                   help="average the weights of the last N epochs (swa.pt; the reported model with the paper "
                        "schedule) [default: the preset's]")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train N times (seeds SEED, SEED+1, ...) on the same split and report the mean and standard "
                        "deviation of the test MAE [default: 1]")
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--lr", type=float, help="peak learning rate [default: the preset's: "
                   + ", ".join(f"{name} {TrainConfig(preset=name).resolved().lr:.0e}".replace("e-0", "e-")
                             for name in TRAIN_PRESETS) + "]")
    p.add_argument("--unit", help="the target's unit, for your own data (e.g. eV)")
    p.add_argument("--max-train", type=int, dest="max_train", help="train on a random subset of this many crystals")
    p.add_argument("--device", help="auto, cpu or cuda[:N] [default: auto]")
    p.add_argument("--backend", choices=BACKENDS,
                   help="sparse operations: DGL's kernels or plain PyTorch [default: auto = dgl where the installed "
                        "DGL supports the device, else torch]")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="on a GPU: bitwise repeatable steps (sums in a fixed order instead of atomics; slower, "
                        "backend torch); on CPU steps are repeatable anyway")
    p.add_argument("--num-workers", type=int, dest="num_workers",
                   help="DataLoader worker processes that batch crystals while the model trains "
                        "[default: 4 on a GPU, 0 on CPU]")
    p.add_argument("--data-dir", dest="data_dir", help="folder holding (or receiving) the jarvis-tools dataset files")
    p.add_argument("--cache-dir", dest="cache_dir", help="graph cache folder")
    p.add_argument("--build-workers", type=int, dest="build_workers", metavar="N",
                   help="processes that build missing graphs (an interrupted build resumes) [default: the cores]")
    p.add_argument("--config", help="YAML/JSON file of TrainConfig keys (flags override it)")
    p.add_argument("--out", dest="out_dir", help="output folder [default: runs/<dataset>-<target>-<frame>]")
    p.add_argument("--resume", action="store_true", default=None, help="continue from OUT/last.pt")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="start over in an OUT that holds an unfinished run (its checkpoints and results are replaced); "
                        "without it, such an OUT is refused")
    p.add_argument("--seed", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return p


FLAG_KEYS = ("dataset", "target", "num_layers", "model_preset", "init_from", "freeze_blocks", "preset", "time_budget",
             "schedule", "epochs", "swa_epochs", "batch_size", "lr", "unit", "max_train", "device", "backend", "threads",
             "num_workers", "deterministic", "data_dir", "cache_dir", "build_workers", "out_dir", "resume", "overwrite",
             "seed")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: Dict[str, Any] = read_config_file(args.config) if args.config else {}
    values.update({k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None})
    if args.frame is not None and args.frame != "all":
        values["frame"] = args.frame
    if args.quiet:
        values["progress"] = False
    return TrainConfig.from_dict(values, source="options")


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Train the configured runs (every frame type for ``--frame all``, ``--seeds`` seeds of each)
    and return their results."""
    from ..finetune import checkpoint_config
    from ..training import load_splits, train_and_evaluate  # torch and DGL load here, not for --help

    started = time.perf_counter()  # a time budget counts the data loading of the first run
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1 (got {args.seeds})")
    base = config_from_args(args)
    if base.init_from and args.frame == "all":
        raise ConfigError("--frame all trains every frame type, --init-from one checkpoint's: use one of them")
    base = checkpoint_config(base)  # fine-tuning: the checkpoint's architecture and cutoff
    frames = list(FRAME_TYPES) if args.frame == "all" else [None]
    configs: List[TrainConfig] = []
    for frame in frames:
        cfg = base if frame is None else base.with_overrides(frame=frame)
        out = cfg.out_dir or default_out_dir(cfg.dataset, cfg.resolved().target,
                                             cfg.model_preset or cfg.model_config().frame)
        if frame is not None and base.out_dir:  # --out DIR with --frame all: DIR/<frame>
            out = os.path.join(base.out_dir, frame)
        for k in range(args.seeds):  # several seeds: OUT/seed-<seed>
            seed = base.seed + k
            configs.append(cfg.with_overrides(seed=seed, out_dir=os.path.join(out, f"seed-{seed}") if args.seeds > 1
                                              else out).resolved())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    # once, before training, so that missing data fails fast (under torchrun the trainer loads it)
    data = None if distributed else load_splits(configs[0], configs[0].progress)
    results = []
    for k, cfg in enumerate(configs):
        results.append(train_and_evaluate(cfg, data=data, started_at=started if k == 0 else None))
    if (args.frame == "all" or args.seeds > 1) and _is_main_rank():
        summary_dir = Path(base.out_dir or default_out_dir(configs[0].dataset, configs[0].target, "all" if args.frame == "all"
                                                           else configs[0].model_config().frame))
        summary_dir.mkdir(parents=True, exist_ok=True)
        runs = [{k: v for k, v in r.items() if k != "config"} for r in results]
        if args.frame == "all":
            (summary_dir / "ablation.json").write_text(json.dumps(runs, indent=2) + "\n")
        summary = {frame: stats(group) for frame, group in by_frame(results).items()}  # test MAE over seeds
        (summary_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def by_frame(results: Sequence[Dict[str, Any]]) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["frame"], []).append(r)
    return groups


def stats(group: Sequence[Dict[str, Any]], key: str = "test_mae") -> Dict[str, Any]:
    """Mean and sample standard deviation of ``key`` over runs (seeds)."""
    values = [float(r[key]) for r in group]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values), "values": values, "seeds": [r.get("seed") for r in group]}


def fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def table(header: Sequence[str], body: Sequence[Sequence[str]]) -> List[str]:
    """Text table lines: first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths)] + [line(row) for row in body]


def mean_std(group: Sequence[Dict[str, Any]], key: str) -> str:
    s = stats(group, key)
    return fmt(s["mean"]) if s["n"] == 1 else f"{fmt(s['mean'])} ± {fmt(s['std'], 2)} ({s['n']} seeds)"


def result_row(name: str, group: Sequence[Dict[str, Any]], published: str = "-") -> List[str]:
    """A table row for the runs (seeds) of one model: test and val MAE as mean ± std over seeds."""
    r = group[0]
    seconds = sum(g["seconds"]["total"] if isinstance(g.get("seconds"), dict) else g["train_seconds"]
                  for g in group) / len(group)
    return [name, published, mean_std(group, "test_mae"), mean_std(group, "val_mae"), f"{r['params']:,}",
            str(r["epochs"]), f"{seconds:.0f}"]


RESULT_HEADER = ("model", "published", "this run", "val MAE", "params", "epochs", "wall s")


def spread_lines(results: Sequence[Dict[str, Any]]) -> List[str]:
    """Several frames, several seeds each: is each frame's gap to the best larger than the spread
    between seeds?  (Difference of the mean test MAEs against twice its standard error.)"""
    groups = {frame: stats(group) for frame, group in by_frame(results).items()}
    if len(groups) < 2 or any(s["n"] < 2 for s in groups.values()):
        return []
    best = min(groups, key=lambda f: groups[f]["mean"])
    b = groups[best]
    lines = [f"against frame {best} (lowest mean test MAE), over seeds:"]
    for frame, s in groups.items():
        if frame != best:
            diff = s["mean"] - b["mean"]
            se = math.sqrt(s["std"] ** 2 / s["n"] + b["std"] ** 2 / b["n"])
            verdict = "larger than" if diff > 2 * se else "within"
            lines.append(f"  frame {frame}: +{fmt(diff, 2)} (standard error {fmt(se, 2)}), {verdict} the spread "
                         "between seeds (2 standard errors)")
    return lines


def run_lines(results: Sequence[Dict[str, Any]]) -> List[str]:
    lines = []
    for frame, group in by_frame(results).items():
        r = group[0]
        where = r.get("out_dir") if len(group) == 1 else str(Path(r["out_dir"]).parent)
        lines.append(f"frame {frame}: preset {r.get('preset')}, {r.get('schedule')} schedule, "
                     f"{r['n_train']:,}/{r['n_val']:,}/{r['n_test']:,} train/val/test ({r.get('split')}), reported "
                     f"model {r.get('reported_model')}, {r.get('crystals_per_second') or 0:.0f} crystals/s training, "
                     f"{r.get('latency_ms_per_crystal') or 0:.3g} ms/crystal inference, results in {where}")
    return lines


def format_results(results: Sequence[Dict[str, Any]]) -> str:
    """The test MAE of each run, with the train-mean baseline."""
    first = results[0]
    unit = first.get("unit") or ""
    lines = [f"Test MAE, {first['dataset']} / {first['target']}" + (f" ({unit})" if unit else "")]
    body = [result_row(FRAME_LABELS.get(frame, frame), group) for frame, group in by_frame(results).items()]
    body.append(["(predicting the train mean)", "-", fmt(first.get("test_mae_of_train_mean")), "", "", "", ""])
    return "\n".join(lines + table(RESULT_HEADER, body) + spread_lines(results) + run_lines(results))


def main(argv: Optional[Sequence[str]] = None, prog: str = "dgl-crystalframer train",
         report: Callable[[Sequence[Dict[str, Any]]], str] = format_results) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the last completed epoch is saved in OUT/last.pt; rerun the same command with --resume "
              "to continue", file=sys.stderr)
        return 130
    if _is_main_rank():
        print(report(results))
    return 0


__all__ = ["FRAME_LABELS", "build_parser", "config_from_args", "format_results", "main", "run", "spread_lines"]
