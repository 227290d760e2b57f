"""The angular histogram kernels of ``nn._AngularAggregate``: a fused CPU kernel (numba) and the
same computation in torch operations (GPU, or CPU without numba).

Both fill, for a range of destination atoms [n0, n1), the per-(head, atom, axis) histogram of
polynomial moments of the cosines (``basis.angle_basis_table``)::

    hist[h, n - n0, (k, s, m)] = sum_{e -> n} w[e, h] * t[e, h, k]^m,  (s, t) = segment_of(cos[e, h, k])

and, for backward, its transpose: dL/dw[e, h] = sum_k sum_m dL/dhist[(n, h, k), s, m] * t^m.
Edges must be sorted by destination (``indptr`` [N + 1] gives each atom's edge range).

Why a fused kernel: the work is a few flops and ``M`` scattered additions per (edge, head, axis),
about 1e6 of them per layer at batch 64.  Written as torch operations that is a dozen passes over
[E, H, 3, M] temporaries and an int64 index tensor; the numba kernel does it in one pass from
registers, 4x faster for forward + backward on 2 cores (``python -m benchmarks.perf``).

``BACKEND`` is ``"numba"`` when numba imports, else ``"torch"``; the environment variable
``DGL_CRYSTALFRAMER_KERNELS=torch`` forces the torch version (for comparison and debugging).
CUDA tensors always take the torch version.  numba compiles each kernel once per dtype on first
use (about a second) and caches the result on disk.  Its parallel loops run on as many threads as
torch uses; with numba's OpenMP threading layer they may use a second GNU OpenMP runtime, which
reads the same wait policy from the environment (``_openmp.py``), so idle threads do not spin
against torch's (measured: the same speed as numba's own ``workqueue`` layer).
"""
from __future__ import annotations

import os

import torch

from . import basis as B

try:  # an optional speed-up: everything works without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - numba is a dependency; this is the fallback
    numba = None

BACKEND = "numba" if numba is not None else "torch"
if os.environ.get("DGL_CRYSTALFRAMER_KERNELS", "").strip().lower() == "torch":
    BACKEND = "torch"


def _use_numba(t: torch.Tensor) -> bool:
    return BACKEND == "numba" and t.device.type == "cpu"


def _sync_threads():
    """Run numba's parallel loops on as many threads as torch uses (``torch.set_num_threads``)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def histogram(indptr: torch.Tensor, cos: torch.Tensor, weight: torch.Tensor, sym: torch.Tensor, chunk, half: int,
              S: int, M: int, mirror_axes=(0, 1, 2)) -> torch.Tensor:
    """-> hist [H, n1 - n0, 3 * S * M] for the atoms n0..n1-1 (head-major, for a batched matmul per head).

    indptr: [N + 1] int64 edge offsets; chunk: (n0, n1, e0, e1), the atoms and their edge range
    indptr[n0]..indptr[n1]; cos: [E, H, 3]; weight: [E, H] (a zero weight adds nothing);
    sym: [N, H, 3] bool, where the feature is symmetrised over c -> -c: each cosine then adds
    half its weight at c and half at -c.  ``mirror_axes``: the only axes where ``sym`` can be set
    (the torch version computes mirror images for those alone)."""
    n0, n1, e0, e1 = chunk
    H = cos.shape[1]
    if _use_numba(cos):
        hist = cos.new_empty(H * (n1 - n0) * 3 * S * M)  # the kernel zeroes its own rows
        _sync_threads()
        _hist_numba(indptr.numpy(), cos.detach().numpy(), weight.detach().numpy(), sym.numpy(), n0, n1, float(half), S,
                    M, hist.numpy())
        return hist.view(H, n1 - n0, 3 * S * M)
    w = weight[e0:e1].unsqueeze(-1).unsqueeze(-1)
    hist = cos.new_zeros(H * (n1 - n0) * 3 * S, M)
    for idx, mom in _taps(indptr, cos, sym, chunk, half, S, M, mirror_axes):
        hist.index_add_(0, idx.reshape(-1), (mom * w).reshape(-1, M))
    return hist.view(H, n1 - n0, 3 * S * M)


def histogram_transpose(indptr: torch.Tensor, cos: torch.Tensor, sym: torch.Tensor, grad_hist: torch.Tensor,
                        chunk, half: int, S: int, M: int, grad_weight: torch.Tensor, mirror_axes=(0, 1, 2)) -> None:
    """grad_weight[e, h] = d(sum(grad_hist * hist)) / d weight[e, h] for the edges of the chunk's
    atoms, written in place.  grad_hist: [H, n1 - n0, 3 * S * M] as ``histogram`` returns."""
    n0, n1, e0, e1 = chunk
    if _use_numba(cos):
        _sync_threads()
        _hist_t_numba(indptr.numpy(), cos.detach().numpy(), sym.numpy(), n0, n1, float(half), S, M,
                      grad_hist.detach().contiguous().view(-1).numpy(), grad_weight.detach().numpy())
        return
    flat = grad_hist.reshape(-1, M)
    grad_weight[e0:e1] = sum((flat[idx] * mom).sum((-1, -2)) for idx, mom in _taps(indptr, cos, sym, chunk, half, S, M,
                                                                                  mirror_axes))


def _taps(indptr, cos, sym, chunk, half: int, S: int, M: int, mirror_axes):
    """torch version, for the edges of the chunk: [(flat histogram rows (row * S + segment) [e, H, k],
    moments [e, H, k, M])] for each cosine (weight 1/2 where ``sym``) and, for the axes in
    ``mirror_axes``, its mirror image -c (weight 1/2 where ``sym``, else 0).  Dense, so that no
    size depends on the data (no device synchronisation on a GPU)."""
    n0, n1, e0, e1 = chunk
    cos = cos[e0:e1]
    E, H, _ = cos.shape
    counts = indptr[n0 + 1:n1 + 1] - indptr[n0:n1]
    local = torch.repeat_interleave(torch.arange(n1 - n0, device=cos.device), counts, output_size=E)
    h = torch.arange(H, device=cos.device).view(1, H, 1)
    k = torch.arange(3, device=cos.device).view(1, 1, 3)
    row = ((h * (n1 - n0) + local.view(E, 1, 1)) * 3 + k) * S  # [E, H, 3]
    powers = torch.arange(M, device=cos.device, dtype=cos.dtype)
    half_w = 0.5 * sym[n0:n1][local].to(cos.dtype)  # [E, H, 3]: 1/2 where symmetrised, else 0
    s, t = B.angle_segments(cos, half)
    taps = [(row + s, t.unsqueeze(-1) ** powers * (1.0 - half_w).unsqueeze(-1))]
    if mirror_axes:
        ax = list(mirror_axes)
        s_m, t_m = B.angle_segments(-cos[:, :, ax], half)
        taps.append((row[:, :, ax] + s_m, t_m.unsqueeze(-1) ** powers * half_w[:, :, ax].unsqueeze(-1)))
    return taps


if numba is not None:
    # The loops mirror basis.angle_segments and _taps; prange over atoms, so each thread owns its rows.
    @njit(parallel=True, cache=True, nogil=True)
    def _hist_numba(indptr, cos, w, sym, n0, n1, half, S, M, hist):  # pragma: no cover - compiled
        H = cos.shape[1]
        nc = n1 - n0
        for nl in prange(nc):
            n = n0 + nl
            for h in range(H):
                start = (h * nc + nl) * 3 * S * M
                hist[start:start + 3 * S * M] = 0.0
            for e in range(indptr[n], indptr[n + 1]):
                for h in range(H):
                    we = w[e, h]
                    if we == 0.0:
                        continue
                    for k in range(3):
                        row = ((h * nc + nl) * 3 + k) * S
                        u = min(max((cos[e, h, k] + 1.0) * half, 0.0), 2.0 * half)
                        if sym[n, h, k]:
                            _add_moments(hist, row, 2.0 * half - u, 0.5 * we, S, M)
                            _add_moments(hist, row, u, 0.5 * we, S, M)
                        else:
                            _add_moments(hist, row, u, we, S, M)

    @njit(inline="always")
    def _add_moments(hist, row, u, we, S, M):  # pragma: no cover - compiled
        s = min(int(u), S - 1)
        t = u - s
        base = (row + s) * M
        p = we
        for m in range(M):
            hist[base + m] += p
            p *= t

    @njit(inline="always")
    def _dot_moments(grad_hist, row, u, S, M):  # pragma: no cover - compiled
        s = min(int(u), S - 1)
        t = u - s
        base = (row + s) * M
        acc = 0.0
        p = 1.0
        for m in range(M):
            acc += grad_hist[base + m] * p
            p *= t
        return acc

    @njit(parallel=True, cache=True, nogil=True)
    def _hist_t_numba(indptr, cos, sym, n0, n1, half, S, M, grad_hist, grad_w):  # pragma: no cover - compiled
        H = cos.shape[1]
        nc = n1 - n0
        for nl in prange(nc):
            n = n0 + nl
            for e in range(indptr[n], indptr[n + 1]):
                for h in range(H):
                    acc = 0.0
                    for k in range(3):
                        row = ((h * nc + nl) * 3 + k) * S
                        u = min(max((cos[e, h, k] + 1.0) * half, 0.0), 2.0 * half)
                        if sym[n, h, k]:
                            acc += 0.5 * (_dot_moments(grad_hist, row, u, S, M)
                                          + _dot_moments(grad_hist, row, 2.0 * half - u, S, M))
                        else:
                            acc += _dot_moments(grad_hist, row, u, S, M)
                    grad_w[e, h] = acc
