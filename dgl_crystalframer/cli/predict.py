"""``dgl-crystalframer predict``: checkpoint(s) + structure files, folders or datasets -> CSV of predictions.

    dgl-crystalframer predict a.cif b.vasp some_folder/ my_data.csv --checkpoint runs/x/model.pt [--out preds.csv]
    dgl-crystalframer predict --checkpoint seed-123/model.pt seed-124/model.pt seed-125/model.pt -- a.cif   # an ensemble

prints ``id,<target> (<unit>)[,std][,<target> (given),error],in_domain,domain_note`` then one line
per crystal (values in the target's original units) on stdout; a structure that cannot be read or
used gets one ``error: ...`` line on stderr and the others are still predicted.  A warning line
counts the crystals outside the training domain (``--strict``: an error), and a dataset with the
target gives an MAE line.  Exit status 2 for user errors, including when nothing was predicted.
"""
from __future__ import annotations

import argparse
import csv
import sys
from typing import List, Optional, Sequence, Tuple

from ..config import BACKENDS
from .convert import add_checkpoint_options

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def build_parser(prog: str = "dgl-crystalframer predict") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print id and prediction (original units) per crystal as CSV "
                                "on stdout, with the training-domain check; unreadable files get an error line on "
                                "stderr and the rest are still predicted.")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="structure files (CIF, POSCAR/CONTCAR/.vasp, pymatgen JSON, ...), folders of them, and "
                        "datasets as train takes them (a CSV, a folder with id_prop.csv, a JSON list of records)")
    p.add_argument("--checkpoint", "-c", required=True, nargs="+", action="extend", metavar="FILE",
                   help="a checkpoint written by training (model.pt, best.pt, swa.pt or last.pt) or an official "
                        "CrystalFramer .ckpt; several make an "
                        "ensemble (mean and std per crystal). Files ending .pt/.pth/.ckpt; inputs may follow them")
    p.add_argument("--out", "-o", help="also write the predictions to this CSV file")
    p.add_argument("--target", help="the datasets' column to compare with (MAE and an error column) "
                                    "[default: the checkpoint's target]")
    p.add_argument("--strict", action="store_true",
                   help="exit with an error (status 2) if a crystal lies outside the training domain, or the "
                        "checkpoint records none")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="sparse operations: DGL's kernels or plain PyTorch (default: auto)")
    p.add_argument("--batch-size", type=int, default=64, help="crystals per inference batch (default 64)")
    add_checkpoint_options(p)
    return p


def split_checkpoints(checkpoints: Sequence[str], inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """``--checkpoint a.pt b.pt x.cif``: the checkpoints are the leading files ending .pt/.pth/.ckpt
    (at least one), the rest are inputs."""
    k = 1
    while k < len(checkpoints) and checkpoints[k].lower().endswith(CHECKPOINT_SUFFIXES):
        k += 1
    return list(checkpoints[:k]), list(checkpoints[k:]) + list(inputs)


def main(argv: Optional[Sequence[str]] = None, prog: str = "dgl-crystalframer predict") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    checkpoints, inputs = split_checkpoints(args.checkpoint, args.inputs)
    if not inputs:
        parser.error("give at least one structure file, folder or dataset to predict")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1 (got {args.batch_size})")
    from ..errors import UserError
    from ..predict import Predictor, error_line  # torch and DGL load here, not for --help

    try:
        predictor = Predictor(checkpoints, device=args.device, batch_size=args.batch_size, backend=args.backend,
                              weights=args.weights, overrides=dict(args.override))
    except (KeyError, RuntimeError, TypeError) as exc:  # a checkpoint file of the format whose content does not fit
        raise UserError(f"{' '.join(checkpoints)}: cannot build a model from it ({type(exc).__name__}: "
                        f"{error_line(exc)})") from exc
    result = predictor.predict(inputs, target=args.target)
    for name, msg in result.errors:
        print(f"error: {name}: {msg}" if not msg.startswith(str(name)) else f"error: {msg}", file=sys.stderr)
    if not result.ids:
        raise UserError(f"nothing could be predicted ({len(result.errors)} input(s) failed, each named above)")
    first = next(((i, d) for i, d in zip(result.ids, result.domain) if d), None)
    outside = (f"{result.n_outside} of {len(result.ids)} crystals are outside the training domain of "
               f"{'the ensemble' if predictor.ensemble else 'the checkpoint'} (first: {first[0]}: {first[1]})"
               if first else "")
    if args.strict and not result.domain_known:
        raise UserError("--strict: the checkpoint records no training domain (written by an older version, or "
                        "converted); predict without --strict (in_domain says unknown)")
    if args.strict and outside:
        raise UserError(f"--strict: {outside}; predict without --strict to get them flagged in the in_domain column")
    rows = table(predictor, result, args.target or predictor.target)
    csv.writer(sys.stdout, lineterminator="\n").writerows(rows)
    sys.stdout.flush()
    if args.out:
        with open(args.out, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(rows)
    if outside:
        print(f"warning: {outside}: their predictions are extrapolations (in_domain=no)", file=sys.stderr)
    elif not result.domain_known:
        print("note: the checkpoint records no training domain (written by an older version, or converted): "
              "in_domain is unknown", file=sys.stderr)
    mae, n_given = result.mae()
    if mae is not None:
        print(f"MAE {mae:.4g}{' ' + predictor.unit if predictor.unit else ''} over the {n_given} crystals with a given "
              f"{args.target or predictor.target}" + (f" ({len(result.ids) - n_given} without)"
                                                       if n_given < len(result.ids) else ""), file=sys.stderr)
    if result.errors:
        print(f"{len(result.ids)} predicted, {len(result.errors)} failed", file=sys.stderr)
    return 0


def table(predictor, result, given_name: str) -> List[List[str]]:
    """The CSV rows: header, then one row per crystal."""
    name = f"{predictor.target} ({predictor.unit})" if predictor.unit else predictor.target
    header = ["id", name] + (["std"] if result.std is not None else [])
    if result.given is not None:
        header += [f"{given_name} (given)", "error"]
    header += ["in_domain", "domain_note"]
    rows = [header]
    for k, (i, v, d) in enumerate(zip(result.ids, result.values, result.domain)):
        row = [i, f"{v:.6g}"] + ([f"{result.std[k]:.3g}"] if result.std is not None else [])
        if result.given is not None:
            g = result.given[k]
            row += ["", ""] if g != g else [f"{g:.6g}", f"{v - g:.4g}"]
        row += ["unknown" if d is None else ("no" if d else "yes"), d or ""]
        rows.append(row)
    return rows


__all__ = ["build_parser", "main", "split_checkpoints"]
