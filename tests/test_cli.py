"""The command line (dgl_crystalframer/cli): the commands exist, the console script and
``python -m dgl_crystalframer`` run, and user errors are one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgl_crystalframer.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=180):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "dgl_crystalframer", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_commands_and_help(capsys):
    assert list(COMMANDS) == ["train", "predict", "convert", "hpo", "report", "perf", "invariance", "scaling"]
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main([]) == 2
    assert main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'dgl-crystalframer = "dgl_crystalframer.cli:main"' in text


def one_error_line(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr  # logs may precede it
    return errors[0]


def _csv(path: Path, rows, header="id,structure,y,split"):
    path.write_text("\n".join([header] + rows) + "\n")
    return path


POSCAR = '"Si\n1.0\n5.43 0 0\n0 5.43 0\n0 0 5.43\nSi\n2\ndirect\n0 0 0\n0.25 0.25 0.25\n"'  # quoted: newlines in a CSV cell


def test_user_errors_exit_2_with_one_line(tmp_path):
    # a bad flag value: argparse's own message (usage + error), status 2
    proc = run_cli("train", "--frame", "maximum")
    assert proc.returncode == 2 and "invalid choice: 'maximum'" in proc.stderr and "Traceback" not in proc.stderr
    # a missing column
    bad = _csv(tmp_path / "nostruct.csv", ["a,1.0,train"], header="id,y,split")
    assert "need a structure column" in one_error_line(run_cli("train", "--dataset", str(bad), "--target", "y",
                                                               "--preset", "smoke", "--out", str(tmp_path / "o1")))
    # an unknown target column
    ok = _csv(tmp_path / "ok.csv", [f"s{k},{POSCAR},{k * 0.1},train" for k in range(4)])
    assert "no target column" in one_error_line(run_cli("train", "--dataset", str(ok), "--target", "band_gap",
                                                        "--out", str(tmp_path / "o2")))
    # an empty split: every entry in train
    assert "empty split" in one_error_line(run_cli("train", "--dataset", str(ok), "--target", "y", "--preset", "smoke",
                                                   "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o3")))
    # an unreadable file
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(b"\x00\x01\x02 not a csv\n\xff\xfe")
    assert "garbage.csv" in one_error_line(run_cli("train", "--dataset", str(garbage), "--target", "y",
                                                   "--out", str(tmp_path / "o4")))
    # a missing checkpoint
    assert "nope.pt" in one_error_line(run_cli("predict", "--checkpoint", str(tmp_path / "nope.pt"), str(ok)))


def test_error_lines_keep_the_closing_quote_of_a_path(capsys):
    from dgl_crystalframer.cli import run_command
    from dgl_crystalframer.errors import StructureError

    def fail(exc):
        def run():
            raise exc
        return run

    assert run_command(fail(StructureError("x: no such file '/data/a b.cif'"))) == 2
    assert capsys.readouterr().err.strip() == "error: x: no such file '/data/a b.cif'"
    assert run_command(fail(FileNotFoundError(2, "No such file or directory", "/data/c.csv"))) == 2
    assert capsys.readouterr().err.strip() == "error: [Errno 2] No such file or directory: '/data/c.csv'"
