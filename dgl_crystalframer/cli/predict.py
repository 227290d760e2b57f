"""``dgl-crystalframer predict``: checkpoint + structure files/folders -> CSV of predictions.

    dgl-crystalframer predict --checkpoint runs/x/model.pt a.cif b.vasp some_folder/ [--out preds.csv]

prints ``id,<target> (<unit>)`` then one line per structure (values in the target's original
units) on stdout; a structure that cannot be read or used gets one ``error: ...`` line on stderr
and the others are still predicted.  The exit status is non-zero only when nothing was predicted.
"""
from __future__ import annotations

import argparse
import csv
import sys
from typing import Optional, Sequence

from ..config import BACKENDS
from .convert import add_checkpoint_options


def build_parser(prog: str = "dgl-crystalframer predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print id and prediction (original units) per structure as CSV "
                                "on stdout; unreadable files get an error line on stderr and the rest are still predicted.")
    p.add_argument("inputs", nargs="+", metavar="FILE_OR_FOLDER",
                   help="structure files (CIF, POSCAR/CONTCAR/.vasp, pymatgen JSON, ...) and/or folders of them")
    p.add_argument("--checkpoint", "-c", required=True, help="a checkpoint written by training (model.pt, best.pt, swa.pt "
                   "or last.pt) or an official CrystalFramer .ckpt")
    p.add_argument("--out", "-o", help="also write the predictions to this CSV file")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="sparse operations: DGL's kernels or plain PyTorch (default: auto)")
    p.add_argument("--batch-size", type=int, default=64, help="crystals per inference batch (default 64)")
    add_checkpoint_options(p)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "dgl-crystalframer predict") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1 (got {args.batch_size})")
    from ..predict import Predictor, error_line  # torch and DGL load here, not for --help

    try:
        predictor = Predictor(args.checkpoint, device=args.device, batch_size=args.batch_size, backend=args.backend,
                              weights=args.weights, overrides=dict(args.override))
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    ids, values, errors = predictor.predict_files(args.inputs)
    for name, msg in errors:
        print(f"error: {name}: {msg}" if not msg.startswith(str(name)) else f"error: {msg}", file=sys.stderr)
    header = ["id", f"{predictor.target} ({predictor.unit})" if predictor.unit else predictor.target]
    rows = [header] + [[name, f"{v:.6g}"] for name, v in zip(ids, values)]
    csv.writer(sys.stdout, lineterminator="\n").writerows(rows)
    sys.stdout.flush()
    if args.out:
        with open(args.out, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    if not ids:
        print("error: nothing could be predicted", file=sys.stderr)
        return 1
    if errors:
        print(f"{len(ids)} predicted, {len(errors)} failed", file=sys.stderr)
    return 0


__all__ = ["build_parser", "main"]
