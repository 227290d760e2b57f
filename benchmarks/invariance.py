"""``python -m benchmarks.invariance``: the same as ``dgl-crystalframer invariance`` (dgl_crystalframer/bench/invariance.py)."""
import sys

from dgl_crystalframer.cli import command, run_command

if __name__ == "__main__":
    sys.exit(run_command(lambda: command("invariance")(sys.argv[1:], prog="python -m benchmarks.invariance")))
