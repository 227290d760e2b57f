"""``python -m dgl_crystalframer COMMAND ...``: the command line (dgl_crystalframer/cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dgl_crystalframer"))
