"""The README and docs/ARCHITECTURE.md cannot drift from the code: every Python snippet of the README
runs, every command line in it parses with the command's own parser, every name the architecture
page lists exists, and the package face exports what it promises."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
ARCHITECTURE = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")


def code_blocks(text: str, lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


# ------------------------------------------------------------------------------ README: Python


PYTHON_BLOCKS = code_blocks(README, "python")


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_snippet_runs(index, tmp_path):
    """Each snippet in a fresh interpreter, in an empty folder (outputs go there), graphs from the
    shared test cache."""
    script = tmp_path / "snippet.py"
    script.write_text(PYTHON_BLOCKS[index])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "DGL_CRYSTALFRAMER_CACHE": str(REPO / ".cache" / "graphs")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, f"README snippet {index}:\n{PYTHON_BLOCKS[index]}\n{proc.stderr[-3000:]}"
    assert "np.float64(" not in proc.stdout, proc.stdout  # what it prints reads as numbers


# ------------------------------------------------------------------------------ README: commands


def _parser_for(words):
    """(parser, arguments) of a README command line, or None for lines that are not ours."""
    from dgl_crystalframer.bench import invariance, perf, scaling
    from dgl_crystalframer.cli import COMMANDS
    from dgl_crystalframer.cli import convert as convert_cli
    from dgl_crystalframer.cli import predict as predict_cli
    from dgl_crystalframer.cli import train as train_cli
    from dgl_crystalframer.hpo import cli as hpo_cli

    parsers = {"train": train_cli.build_parser, "predict": predict_cli.build_parser, "convert": convert_cli.build_parser,
               "hpo": hpo_cli.sweep_parser,
               "report": hpo_cli.report_parser, "perf": perf.build_parser, "invariance": invariance.build_parser,
               "scaling": scaling.build_parser}
    assert set(parsers) == set(COMMANDS)
    if "torchrun" in words[:1]:
        words = words[words.index("-m"):]
        words = ["python"] + words
    if words[:1] == ["dgl-crystalframer"] or words[:3] == ["python", "-m", "dgl_crystalframer"]:
        rest = words[1:] if words[0] == "dgl-crystalframer" else words[3:]
        assert rest and rest[0] in parsers, f"unknown command in README: {' '.join(words)}"
        return parsers[rest[0]](), rest[1:]
    wrappers = {"benchmarks.jarvis": "train", "benchmarks.perf": "perf", "benchmarks.invariance": "invariance",
                "benchmarks.scaling": "scaling"}
    if words[:2] == ["python", "-m"] and words[2] in wrappers:
        return parsers[wrappers[words[2]]](), words[3:]
    if words[:3] == ["python", "-m", "hpo"]:
        if words[3:4] == ["report"]:
            return parsers["report"](), words[4:]
        return parsers["hpo"](), words[3:]
    return None


def readme_command_lines():
    lines = []
    for block in code_blocks(README, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_commands_parse():
    """Every dgl-crystalframer / python -m ... line of the README uses a real command and real flags."""
    checked = 0
    for line in readme_command_lines():
        words = shlex.split(line)
        if words[:1] == ["make"]:
            makefile = (REPO / "Makefile").read_text()
            assert all(re.search(rf"^{w}:", makefile, flags=re.M) for w in words[1:] if "=" not in w), line
            continue
        found = _parser_for(words)
        if found is None:
            continue
        parser, args = found
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # --help lines print and exit 0
                parser.parse_args(args)
        except SystemExit as exc:
            if exc.code not in (0, None):
                pytest.fail(f"README command does not parse ({exc.code}): {line}")
        checked += 1
    assert checked >= 15


# ------------------------------------------------------------------------------ ARCHITECTURE


def architecture_rows():
    """(module path as listed, [names]) of the library table."""
    rows = []
    for line in ARCHITECTURE.splitlines():
        m = re.match(r"\| `([a-z_/]+(?:\.py)?|[a-z_]+/)` \| .* \| (.*) \|$", line)
        if m:
            names = [re.sub(r"\(.*", "", n) for n in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*(?:\(\))?)`", m.group(2))]
            rows.append((m.group(1), names))
    return rows


def _module_name(listed: str) -> str:
    name = listed[:-3] if listed.endswith(".py") else listed.rstrip("/")
    return "dgl_crystalframer" if name == "__init__" else f"dgl_crystalframer.{name}"


def test_architecture_lists_every_module_and_every_name_exists():
    rows = architecture_rows()
    listed = {r[0] for r in rows}
    pkg = REPO / "dgl_crystalframer"
    on_disk = {p.name for p in pkg.glob("*.py")} | {p.name + "/" for p in pkg.iterdir()
                                                      if p.is_dir() and (p / "__init__.py").exists()}
    assert on_disk - {"__main__.py"} <= listed, f"modules missing from docs/ARCHITECTURE.md: {on_disk - listed}"
    for module, names in rows:
        mod = importlib.import_module(_module_name(module))
        subs = [mod]
        if module.endswith("/"):  # a subpackage: names may live in any of its modules
            subs += [importlib.import_module(f"{mod.__name__}.{p.stem}") for p in (pkg / module).glob("*.py")
                     if p.stem not in ("__init__", "__main__")]
        for name in names:
            assert any(hasattr(m, name) for m in subs), f"docs/ARCHITECTURE.md: {module} has no {name}"


# ------------------------------------------------------------------------------ the package face


def test_public_names_resolve():
    import dgl_crystalframer as dcf

    for name in dcf.__all__:
        assert getattr(dcf, name) is not None, name
    for name in ("build_graph", "StructureError", "CrystalFramer", "CrystalFramerConv", "load_dataset", "TrainConfig",
                 "train_and_evaluate", "load_checkpoint", "Predictor"):
        assert name in dcf.__all__
    with pytest.raises(AttributeError):
        dcf.no_such_thing  # noqa: B018


def test_import_and_help_do_not_load_torch():
    code = ("import sys, dgl_crystalframer; from dgl_crystalframer.cli import main; from dgl_crystalframer.cli import "
            "train; train.build_parser(); assert 'torch' not in sys.modules, 'torch loaded'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


# Data flows one way (docs/ARCHITECTURE.md): a module imports only modules of a lower rank.
RANK = {
    "errors": 0, "datasets": 1, "targets": 1, "schedule": 1, "_openmp": 1, "_graphbolt": 1, "config": 2, "_dgl": 3, "basis": 3,
    "structures": 4, "lattice": 5, "graph": 6, "graph_store": 6, "domain": 7, "sparse": 7, "batch": 8, "kernels": 8, "frames": 9,
    "nn": 10, "model": 11, "sources": 12, "splits": 13, "graph_cache": 13, "data": 14, "official": 14, "checkpoint": 15, "plots": 15,
    "distributed": 15, "finetune": 16, "training": 17, "predict": 18, "cli": 19, "hpo": 19, "bench": 19, "__main__": 20,
}


def _imports_of(path: Path, module: str) -> set:
    """The package's top-level modules that ``module`` imports (relative or absolute)."""
    import ast
    from importlib.util import resolve_name

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = resolve_name("." * node.level + (node.module or ""), package) if node.level else node.module or ""
            targets = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t.split(".")[1] for t in targets if t.startswith("dgl_crystalframer.")}
    return found


def test_no_module_imports_one_above_it():
    pkg = REPO / "dgl_crystalframer"
    for path in sorted(pkg.rglob("*.py")):
        parts = path.with_suffix("").relative_to(pkg).parts
        if parts == ("__init__",):
            continue  # the package face imports everything, lazily
        top = parts[0]
        assert top in RANK, f"{path.relative_to(REPO)}: give it a rank in RANK (and docs/ARCHITECTURE.md)"
        module = ".".join(("dgl_crystalframer",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        for dep in _imports_of(path, module) - {top, "__version__"}:
            assert RANK[dep] < RANK[top], f"{path.relative_to(REPO)} imports {dep}, which is not below it"


def test_the_wheel_installs_only_the_library():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["dgl_crystalframer*"]
    from setuptools import find_packages

    found = find_packages(str(REPO), include=["dgl_crystalframer*"])
    assert found and all(p.split(".")[0] == "dgl_crystalframer" for p in found)
    assert {"benchmarks", "hpo"} & set(find_packages(str(REPO)))  # which exist in the checkout, as wrappers
