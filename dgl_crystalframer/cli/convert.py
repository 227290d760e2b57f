"""``dgl-crystalframer convert``: an official CrystalFramer checkpoint (PyTorch Lightning ``.ckpt``)
-> this package's checkpoint format, which ``predict``, fine-tuning and sweeps take like any other.

    dgl-crystalframer convert epoch=1999-step=348000.ckpt -o jarvis_eform.pt [--weights model] [--override KEY=VALUE]

Prints what was converted (model, target, normaliser, cutoff) on stderr.  The checkpoint is read
without running any of its code (``checkpoint.read_checkpoint``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def key_value(text: str):
    """argparse type of ``--override KEY=VALUE`` (the value parsed as YAML: 4.0, true, [1.4])."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """--weights and --override, shared by convert and predict."""
    p.add_argument("--weights", choices=("swa", "model"), default=None,
                   help="official checkpoints: the weight average (swa, the default when present) or the live model")
    p.add_argument("--override", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="a setting over the checkpoint's own, repeatable: official names for official checkpoints "
                        "(e.g. value_pe_angle_coef=4.0, as the authors' demo.sh), ModelConfig fields for ours")


def build_parser(prog: str = "dgl-crystalframer convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Convert an official CrystalFramer checkpoint (PyTorch Lightning "
                                ".ckpt of omron-sinicx/crystalframer) to this package's checkpoint format.")
    p.add_argument("checkpoint", help="the official .ckpt (or one of ours, rewritten with the overrides)")
    p.add_argument("--out", "-o", required=True, help="the checkpoint to write (e.g. model.pt)")
    add_checkpoint_options(p)
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "dgl-crystalframer convert") -> int:
    args = build_parser(prog).parse_args(argv)
    from pathlib import Path

    from ..checkpoint import atomic_torch_save, load_checkpoint, make_checkpoint  # torch loads here, not for --help

    model, meta = load_checkpoint(args.checkpoint, weights=args.weights, overrides=dict(args.override))
    meta = {k: v for k, v in meta.items() if k not in ("kind", "epoch", "val_mae")}
    meta["converted_from"] = str(args.checkpoint)
    ckpt = make_checkpoint("converted", model.state_dict(), meta, epoch=0)
    atomic_torch_save(ckpt, Path(args.out))
    c = meta["model_config"]
    print(f"{args.out}: {c['frame']} frames, {c['num_layers']} blocks, d={c['dim']}, {model.num_parameters():,} parameters; "
          f"target {meta['target']} ({meta['unit'] or 'unit unknown'}), normaliser mean {meta['normalizer']['mean']:.6g} "
          f"std {meta['normalizer']['std']:.6g}, cutoff {meta['cutoff']:.4g} A, c_dist {c['c_dist']:g}, "
          f"c_angl {c['c_angl']:g}" + ("" if c["frame"] != "none" else " (unused)"), file=sys.stderr)
    return 0


__all__ = ["add_checkpoint_options", "build_parser", "key_value", "main"]
