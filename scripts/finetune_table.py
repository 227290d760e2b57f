#!/usr/bin/env python
"""Tables (Markdown) of training runs found under folders: fine-tuned against from scratch, and
which model (best-validation, final, weight average) scored best on test.

    python scripts/finetune_table.py runs/ft/bulk runs/ft/jarvis     # every results.json below them
    python scripts/finetune_table.py runs/ft --model swa              # the weight averages' test MAEs

Runs are grouped by dataset, target and start (from scratch, or fine-tuned from a checkpoint, with
its frozen blocks, and the peak learning rate); each group's runs are its seeds.  The first table
gives the test MAE of the reported model as mean ± sample standard deviation over seeds, the change
against the best from-scratch group of the same dataset, target and model, the optimiser steps (equal steps make a fair comparison on a shared
machine, where wall time varies with load) and the wall time.  The second gives the test MAE of
each of the three models every run evaluates (results.json "models"), and how often each was the
lowest of the three.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

MODELS = ("best", "final", "swa")


def load_runs(folders: Sequence[str]) -> List[Dict[str, Any]]:
    runs = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("results.json")):
            r = json.loads(path.read_text())
            if "models" in r and "test_mae" in r:
                runs.append(r)
    return runs


def start_of(r: Dict[str, Any]) -> str:
    """'from scratch' or 'fine-tuned from DATASET/TARGET', with the frozen blocks and the peak lr."""
    cfg = r.get("config") or {}
    lr = f", lr {cfg['lr']:g}" if cfg.get("lr") else ""
    src = r.get("init_from")
    if not src:
        return "from scratch" + lr
    frozen = cfg.get("freeze_blocks") or 0
    return f"fine-tuned from {src.get('dataset')}/{src.get('target')}" + (f", {frozen} blocks frozen" if frozen else "") + lr


def groups(runs: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, str, str, str], List[Dict[str, Any]]]:
    """Runs by (dataset, target, model, start): the seeds of one setting."""
    out: Dict[Tuple[str, str, str, str], List[Dict[str, Any]]] = {}
    for r in runs:
        name = Path(r["dataset"]).name
        model = r.get("model_preset") or r.get("frame") or "-"
        out.setdefault((name, r["target"], model, start_of(r)), []).append(r)
    return out


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def span(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if math.isclose(lo, hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(round(seconds % 60)):02d} s"


def mae(r: Dict[str, Any], model: str) -> float:
    """Test MAE of a run's reported model, or of one of its models (best, final, swa)."""
    return r["test_mae"] if model == "reported" else r["models"][model]["test_mae"]


def transfer_table(runs: Sequence[Dict[str, Any]], model: str = "reported") -> str:
    g = groups(runs)
    lines = [f"| data / target | model | start | seeds | n train/val/test | steps | test MAE ({model} model) | vs scratch "
             "| wall |", "|---|---|---|---|---|---|---|---|---|"]
    for (name, target, arch, start), group in sorted(g.items(), key=lambda kv: (*kv[0][:3], not kv[0][3].startswith("from scratch"), kv[0][3])):
        maes = [mae(r, model) for r in group]
        # against the best from-scratch setting of the same data, target and model
        scratch = [statistics.mean(mae(r, model) for r in rs) for (n, t, a, st), rs in g.items()
                   if (n, t, a) == (name, target, arch) and st.startswith("from scratch")]
        change = "-"
        if scratch and not start.startswith("from scratch"):
            change = f"{100 * (statistics.mean(maes) / min(scratch) - 1):+.0f}%"
        r0 = group[0]
        walls = [r["seconds"]["total"] for r in group]
        unit = f" {r0.get('unit')}" if r0.get("unit") else ""
        lines.append(f"| {name} / {target} | {arch} | {start} | {len(group)} | {r0['n_train']}/{r0['n_val']}/{r0['n_test']} | "
                     f"{span([r['steps'] for r in group])} | {mean_std(maes)}{unit} | {change} | "
                     f"{minutes(min(walls))}" + (f" - {minutes(max(walls))}" if len(walls) > 1 else "") + " |")
    return "\n".join(lines)


def models_table(runs: Sequence[Dict[str, Any]]) -> str:
    lines = ["| data / target | model | start | n val | seeds | " + " | ".join(f"test MAE `{m}`" for m in MODELS)
             + " | lowest (runs) |", "|---|---|---|---|---|" + "---|" * len(MODELS) + "---|"]
    for (name, target, arch, start), group in sorted(groups(runs).items()):
        group = [r for r in group if all(m in r["models"] for m in MODELS)]
        if not group:
            continue
        cells = [mean_std([r["models"][m]["test_mae"] for r in group]) for m in MODELS]
        wins = {m: 0 for m in MODELS}
        for r in group:
            wins[min(MODELS, key=lambda m: r["models"][m]["test_mae"])] += 1
        lines.append(f"| {name} / {target} | {arch} | {start} | {group[0]['n_val']} | {len(group)} | " + " | ".join(cells)
                     + " | " + ", ".join(f"{m} {k}" for m, k in wins.items() if k) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="folders searched for results.json")
    p.add_argument("--model", choices=("reported",) + MODELS, default="reported",
                   help="whose test MAE the first table shows [default: each run's reported model]")
    args = p.parse_args(argv)
    runs = load_runs(args.folders)
    if not runs:
        print(f"error: no results.json with test MAEs under {', '.join(args.folders)}", file=sys.stderr)
        return 2
    print(transfer_table(runs, args.model))
    print()
    print(models_table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
