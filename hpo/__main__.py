"""``python -m hpo [sweep options]`` and ``python -m hpo report ...``: the same as
``dgl-crystalframer hpo ...`` and ``dgl-crystalframer report ...``."""
import sys

from dgl_crystalframer.cli import command, run_command

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["report"]:
        sys.exit(run_command(lambda: command("report")(argv[1:], prog="python -m hpo report")))
    argv = argv[1:] if argv[:1] == ["sweep"] else argv
    sys.exit(run_command(lambda: command("hpo")(argv, prog="python -m hpo")))
