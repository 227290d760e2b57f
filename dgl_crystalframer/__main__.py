"""Command line: ``python -m dgl_crystalframer {predict,train} ...`` (also ``dgl-crystalframer``).

    predict   checkpoint + structure files/folders -> CSV of predictions (see predict.py)
    train     the training/benchmark CLI, same options as ``python -m benchmarks.jarvis``
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m dgl_crystalframer",
                                     description="CrystalFramer on DGL: predict with a trained checkpoint, or train.")
    sub = parser.add_subparsers(dest="command", metavar="{predict,train}")
    p_pred = sub.add_parser("predict", help="predict properties of structure files with a checkpoint",
                            description="Print id and prediction (original units) per structure as CSV on stdout; "
                                        "unreadable files get an error line on stderr and the rest are still predicted.")
    sub.add_parser("train", help="train and evaluate (same options as python -m benchmarks.jarvis)", add_help=False)
    if argv[:1] == ["train"]:
        from benchmarks.jarvis import main as train_main

        return train_main(argv[1:], prog="python -m dgl_crystalframer train")
    from .predict import add_arguments, run

    add_arguments(p_pred)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
