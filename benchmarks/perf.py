"""``python -m benchmarks.perf``: the same as ``dgl-crystalframer perf`` (dgl_crystalframer/bench/perf.py)."""
import sys

from dgl_crystalframer.cli import command, run_command

if __name__ == "__main__":
    sys.exit(run_command(lambda: command("perf")(sys.argv[1:], prog="python -m benchmarks.perf")))
