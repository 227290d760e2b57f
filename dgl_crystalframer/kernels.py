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

import numpy as np
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
        # a slice where the axes are contiguous (always, see config.FRAMES): indexing with
        # a list would copy it to the device, blocking the host, in every call
        lo, hi = min(mirror_axes), max(mirror_axes) + 1
        ax = slice(lo, hi) if sorted(mirror_axes) == list(range(lo, hi)) else list(mirror_axes)
        s_m, t_m = B.angle_segments(-cos[:, :, ax], half)
        taps.append((row[:, :, ax] + s_m, t_m.unsqueeze(-1) ** powers * half_w[:, :, ax].unsqueeze(-1)))
    return taps


def max_style_frames(indptr: torch.Tensor, order, score: torch.Tensor, secondary, rhat: torch.Tensor,
                     candidate: torch.Tensor, weights: torch.Tensor, tie_tol: float, collinear_cos: float):
    """``frames._max_style_frames`` in one fused CPU pass (numba): the same rules, the same ties.

    The torch version is about a hundred small tensor operations per layer, which dominate the
    time of small batches (single-crystal prediction).  Inputs as there, edges in the graph's order;
    ``order`` sorts them by destination (None: they are).  Returns (frames [N, H, 3, 3], tied [N, H]).
    """
    E, H = score.shape
    N = indptr.shape[0] - 1
    if order is not None:
        score, rhat, candidate, weights = score[order], rhat[order], candidate[order], weights[order]
        secondary = secondary[order] if secondary is not None else None
        edge_id = order.numpy()
    else:
        edge_id = np.arange(E, dtype=np.int64)
    frames = np.empty((N, H, 3, 3), dtype=np.float64)
    tied = np.empty((N, H), dtype=np.bool_)
    sec = secondary.detach().double().contiguous().numpy() if secondary is not None else np.zeros((1, 1))
    _sync_threads()
    _max_frames_numba(indptr.numpy(), edge_id, score.detach().double().contiguous().numpy(), sec,
                      secondary is not None, rhat.detach().double().contiguous().numpy(),
                      candidate.contiguous().numpy(), weights.detach().double().contiguous().numpy(),
                      float(tie_tol), float(collinear_cos), frames, tied)
    return torch.from_numpy(frames).to(rhat.dtype), torch.from_numpy(tied)


def use_numba_frames(t: torch.Tensor) -> bool:
    """Whether ``max_style_frames`` runs for tensors like ``t`` (CPU, numba installed and chosen)."""
    return _use_numba(t)


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

    @njit(inline="always")
    def _near(value, best, tol):  # pragma: no cover - compiled
        return value >= best - tol * (1.0 + abs(best))

    @njit(parallel=True, cache=True, nogil=True)
    def _max_frames_numba(indptr, edge_id, score, sec, has_sec, rhat, cand, w, tol, coll, frames, tied):  # pragma: no cover
        N, H = frames.shape[0], frames.shape[1]
        neg = -np.inf
        for n in prange(N):
            e0, e1_ = indptr[n], indptr[n + 1]
            for h in range(H):
                # e1: the candidate with the best score, ties narrowed by the secondary score, then the lowest edge id
                best = neg
                for e in range(e0, e1_):
                    if cand[e] and score[e, h] > best:
                        best = score[e, h]
                idx1, count1 = -1, 0
                if best > neg:
                    best2 = neg
                    if has_sec:
                        for e in range(e0, e1_):
                            if cand[e] and _near(score[e, h], best, tol) and sec[e, h] > best2:
                                best2 = sec[e, h]
                    for e in range(e0, e1_):
                        if cand[e] and _near(score[e, h], best, tol) and (not has_sec or _near(sec[e, h], best2, tol)):
                            count1 += 1
                            if idx1 < 0 or edge_id[e] < edge_id[idx1]:
                                idx1 = e
                a0, a1, a2 = (rhat[idx1, 0], rhat[idx1, 1], rhat[idx1, 2]) if idx1 >= 0 else (1.0, 0.0, 0.0)
                # m: the attention-weighted mean direction; turn = r . (m x e1)
                m0 = m1 = m2 = 0.0
                for e in range(e0, e1_):
                    if cand[e]:
                        m0 += w[e, h] * rhat[e, 0]
                        m1 += w[e, h] * rhat[e, 1]
                        m2 += w[e, h] * rhat[e, 2]
                c0, c1, c2 = m1 * a2 - m2 * a1, m2 * a0 - m0 * a2, m0 * a1 - m1 * a0
                # e2: best score + log(1 - |cos|) among the non-collinear, ties by secondary + penalty, then turn
                best = neg
                for e in range(e0, e1_):
                    if cand[e]:
                        cos = rhat[e, 0] * a0 + rhat[e, 1] * a1 + rhat[e, 2] * a2
                        if abs(cos) < coll:
                            s2 = score[e, h] + np.log(max(1.0 - abs(cos), 1e-5))
                            if s2 > best:
                                best = s2
                idx2, count2 = -1, 0
                if best > neg:
                    best_s, best_t = neg, neg
                    if has_sec:
                        for e in range(e0, e1_):
                            if cand[e]:
                                cos = rhat[e, 0] * a0 + rhat[e, 1] * a1 + rhat[e, 2] * a2
                                pen = np.log(max(1.0 - abs(cos), 1e-5))
                                if abs(cos) < coll and _near(score[e, h] + pen, best, tol) and sec[e, h] + pen > best_s:
                                    best_s = sec[e, h] + pen
                    for e in range(e0, e1_):
                        if cand[e]:
                            cos = rhat[e, 0] * a0 + rhat[e, 1] * a1 + rhat[e, 2] * a2
                            pen = np.log(max(1.0 - abs(cos), 1e-5))
                            if (abs(cos) < coll and _near(score[e, h] + pen, best, tol)
                                    and (not has_sec or _near(sec[e, h] + pen, best_s, tol))):
                                turn = rhat[e, 0] * c0 + rhat[e, 1] * c1 + rhat[e, 2] * c2
                                if turn > best_t:
                                    best_t = turn
                    for e in range(e0, e1_):
                        if cand[e]:
                            cos = rhat[e, 0] * a0 + rhat[e, 1] * a1 + rhat[e, 2] * a2
                            pen = np.log(max(1.0 - abs(cos), 1e-5))
                            turn = rhat[e, 0] * c0 + rhat[e, 1] * c1 + rhat[e, 2] * c2
                            if (abs(cos) < coll and _near(score[e, h] + pen, best, tol)
                                    and (not has_sec or _near(sec[e, h] + pen, best_s, tol)) and _near(turn, best_t, tol)):
                                count2 += 1
                                if idx2 < 0 or edge_id[e] < edge_id[idx2]:
                                    idx2 = e
                if idx2 >= 0:  # Gram-Schmidt against e1
                    r0, r1, r2 = rhat[idx2, 0], rhat[idx2, 1], rhat[idx2, 2]
                    d = r0 * a0 + r1 * a1 + r2 * a2
                    b0, b1, b2 = r0 - d * a0, r1 - d * a1, r2 - d * a2
                else:  # every candidate collinear with e1 (or none): any perpendicular axis
                    k = 0
                    if abs(a1) < abs(a0):
                        k = 1
                    if abs(a2) < abs(a0) and abs(a2) < abs(a1):
                        k = 2
                    x0, x1, x2 = (1.0 if k == 0 else 0.0), (1.0 if k == 1 else 0.0), (1.0 if k == 2 else 0.0)
                    b0, b1, b2 = a1 * x2 - a2 * x1, a2 * x0 - a0 * x2, a0 * x1 - a1 * x0
                norm = max(np.sqrt(b0 * b0 + b1 * b1 + b2 * b2), 1e-12)
                b0, b1, b2 = b0 / norm, b1 / norm, b2 / norm
                frames[n, h, 0, 0], frames[n, h, 0, 1], frames[n, h, 0, 2] = a0, a1, a2
                frames[n, h, 1, 0], frames[n, h, 1, 1], frames[n, h, 1, 2] = b0, b1, b2
                frames[n, h, 2, 0] = a1 * b2 - a2 * b1
                frames[n, h, 2, 1] = a2 * b0 - a0 * b2
                frames[n, h, 2, 2] = a0 * b1 - a1 * b0
                tied[n, h] = count1 > 1 or (count2 > 1 and idx2 >= 0)
