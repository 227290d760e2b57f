"""The package imports in a fresh interpreter and DGL's sparse kernels work (with gradients)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import dgl_crystalframer
    from dgl_crystalframer._dgl import dgl, dglops, edge_softmax
    import torch

    torch.manual_seed(0)
    # 3 nodes, a multigraph with a self loop and a repeated edge (periodic images look like this)
    src = torch.tensor([0, 1, 2, 0, 1, 1])
    dst = torch.tensor([0, 0, 1, 1, 2, 2])
    g = dgl.graph((src, dst), num_nodes=3)
    q = torch.randn(3, 2, 4, requires_grad=True)   # [N, H, d]
    k = torch.randn(3, 2, 4, requires_grad=True)
    v = torch.randn(3, 2, 4, requires_grad=True)
    logits = dglops.u_dot_v(g, k, q)               # SDDMM: [E, H, 1]
    w = edge_softmax(g, logits)                    # softmax over incoming edges of each dst
    sums = dglops.copy_e_sum(g, w)                 # [N, H, 1]: 1 for nodes with in-edges
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6), sums
    out = dglops.u_mul_e_sum(g, v, w)              # SpMM: [N, H, d]
    out.pow(2).sum().backward()
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name
    print("OK", dgl.__version__)
    """
)


def test_fresh_import_and_dgl_kernels():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_request_without_gpu_explains_fix():
    from dgl_crystalframer import resolve_device

    with pytest.raises(RuntimeError) as info:
        resolve_device("cuda")
    msg = str(info.value)
    assert "CUDA" in msg and "dgl" in msg.lower() and "--device cpu" in msg
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("libs,env,expect", [
    (["libgomp.so.1"], {}, {"GOMP_SPINCOUNT": "10000"}),  # one runtime shared with DGL: brief spinning
    (["libgomp-a34b3233.so.1"], {}, {"OMP_WAIT_POLICY": "passive"}),  # two runtimes would fight
    (["libiomp5.so"], {}, {"OMP_WAIT_POLICY": "passive"}),
    ([], {}, {"OMP_WAIT_POLICY": "passive"}),  # cannot tell: the safe choice
    (["libgomp.so.1"], {"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active"}),  # the user's choice stays
    (["libgomp-a34b3233.so.1"], {"KMP_BLOCKTIME": "0"}, {"KMP_BLOCKTIME": "0"}),
    (["libgomp.so.1"], {"OMP_WAIT_POLICY": " "}, {"GOMP_SPINCOUNT": "10000"}),  # empty counts as unset
])
def test_openmp_wait_policy_choice(monkeypatch, libs, env, expect):
    from dgl_crystalframer import _openmp

    for key in _openmp.USER_KEYS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(_openmp, "torch_openmp_libraries", lambda: libs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _openmp.configure()
    assert {k: os.environ[k] for k in _openmp.USER_KEYS if k in os.environ} == expect
    # torch is imported already here: only a passive policy we could not apply deserves a warning
    assert any("too late" in str(w.message) for w in caught) == (expect == {"OMP_WAIT_POLICY": "passive"} and not env)


# ---------------------------------------------------------------- import dgl in either order

ORDERS = {
    "dgl first": "import dgl\nfrom dgl_crystalframer.nn import CrystalFramerConv\n",
    "package first": "import dgl_crystalframer\nimport dgl\nfrom dgl_crystalframer.nn import CrystalFramerConv\n",
    # a user's script that never imports this package before DGL does its own work
    "dgl only, then the layer": ("import dgl, torch\ng = dgl.graph(([0, 1], [1, 0]))\nassert g.num_edges() == 2\n"
                                 "from dgl_crystalframer import CrystalFramerConv\n"),
}


@pytest.mark.parametrize("order", list(ORDERS))
def test_import_dgl_in_either_order(order):
    """Installed (make setup), the package's start-up hook lets ``import dgl`` work with torch 2.13
    even before the package is imported; the placeholder only appears where graphbolt's library
    is missing."""
    code = ORDERS[order] + textwrap.dedent("""
        import sys, os, torch
        from dgl_crystalframer import _graphbolt
        lib = _graphbolt.library_path()
        assert _graphbolt.placeholder_active() == (not os.path.exists(lib)), lib
        print("OK", torch.__version__)
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_graphbolt_hook_leaves_a_real_library_alone(monkeypatch, tmp_path):
    from dgl_crystalframer import _graphbolt

    finder = next(f for f in sys.meta_path if getattr(f, _graphbolt.MARKER, False))
    # the hook's own copy of the module (the installed .pth loads _graphbolt.py by path)
    hook_globals = type(finder).find_spec.__globals__
    present = tmp_path / "libgraphbolt_pytorch_9.9.9.so"
    present.write_bytes(b"")
    monkeypatch.setitem(hook_globals, "library_path", lambda: str(present))
    assert finder.find_spec("dgl.graphbolt") is None  # DGL's own graphbolt imports untouched
    monkeypatch.setitem(hook_globals, "library_path", lambda: str(tmp_path / "missing.so"))
    spec = finder.find_spec("dgl.graphbolt")
    assert spec is not None and spec.submodule_search_locations == []
    assert finder.find_spec("dgl.sparse") is None and finder.find_spec("numpy") is None
    _graphbolt.install()
    assert sum(getattr(f, _graphbolt.MARKER, False) for f in sys.meta_path) == 1  # installed once
