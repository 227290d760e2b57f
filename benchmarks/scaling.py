"""``python -m benchmarks.scaling``: the same as ``dgl-crystalframer scaling`` (dgl_crystalframer/bench/scaling.py)."""
import sys

from dgl_crystalframer.cli import command, run_command

if __name__ == "__main__":
    sys.exit(run_command(lambda: command("scaling")(sys.argv[1:], prog="python -m benchmarks.scaling")))
