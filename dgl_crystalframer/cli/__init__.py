"""The command line: ``dgl-crystalframer COMMAND ...`` (also ``python -m dgl_crystalframer``).

    train       train and evaluate a model (dataset, target, frame type, schedule)
    predict     predict properties of structure files with a trained checkpoint
    convert     an official CrystalFramer checkpoint (.ckpt) -> this package's format
    hpo         an Optuna sweep over frame type, layers and other settings (needs the [hpo] extra)
    report      tables, best_config.yaml and plots of a sweep
    perf        speed, memory and scaling figures (CPU, or a GPU with --device cuda)
    invariance  the invariance error of each frame type on real crystals
    scaling     memory, disk and speed against the dataset's size (synthetic datasets)

A user error (a bad flag value, a missing file or column, an empty split, an unreadable
structure) prints one ``error:`` line and exits with status 2; Ctrl-C exits with 130.
Commands are imported only when run, so ``--help`` answers at once.
"""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# name -> (module, function, one-line description)
COMMANDS = {
    "train": ("dgl_crystalframer.cli.train", "main", "train and evaluate a model"),
    "predict": ("dgl_crystalframer.cli.predict", "main", "predict properties of structure files with a checkpoint"),
    "convert": ("dgl_crystalframer.cli.convert", "main", "an official CrystalFramer .ckpt -> this package's checkpoint"),
    "hpo": ("dgl_crystalframer.hpo.cli", "main_sweep", "Optuna sweep over frame type, layers, ... (needs [hpo])"),
    "report": ("dgl_crystalframer.hpo.cli", "main_report", "tables, best_config.yaml and plots of a sweep"),
    "perf": ("dgl_crystalframer.bench.perf", "main", "speed, memory and scaling figures"),
    "invariance": ("dgl_crystalframer.bench.invariance", "main", "invariance errors of each frame type"),
    "scaling": ("dgl_crystalframer.bench.scaling", "main", "memory, disk and speed against the dataset's size"),
}
USAGE = "usage: {prog} {{" + ",".join(COMMANDS) + "}} [options]   ({prog} COMMAND --help for a command's options)"


def usage(prog: str) -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [USAGE.format(prog=prog), "", "CrystalFramer (ICLR 2025) on DGL: train, predict, sweep, measure.", "",
             "commands:"]
    lines += [f"  {name:{width}s}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None, prog: str = "dgl-crystalframer") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{USAGE.format(prog=prog)}\n{prog}: error: unknown command {name!r}", file=sys.stderr)
        return 2
    return run_command(lambda: command(name)(rest, prog=f"{prog} {name}"))


def command(name: str):
    """The ``main(argv, prog)`` function of a command (imported now)."""
    module, func, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), func)


def run_command(fn) -> int:
    """Run a command; user errors become one line on stderr and exit status 2."""
    from ..errors import UserError

    try:
        return int(fn() or 0)
    except (UserError, OSError) as exc:  # OSError: a file or folder that cannot be read or written
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    # a KeyError's str() is the repr of its key: take the key itself (never strip a path's closing quote)
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


__all__ = ["COMMANDS", "command", "main", "run_command"]
