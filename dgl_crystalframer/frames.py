"""Frames of CrystalFramer (docs/METHOD.md 3): per target atom i and head h, three axes e1, e2, e3.

Every frame function returns ``(frames, tied)``: frames ``[N, H, 3, 3]`` whose rows
``F[i, h, k]`` are the axes e_k, and tied ``[N, H]`` (see the end of this docstring).  Frames carry
no gradient (they select a coordinate system; gradients still reach sigma and the projections
through the basis values).  Inputs are per-edge tensors of the periodic
multigraph (edge j -> i for every image): ``logits`` / ``weights`` ``[E, H]``, ``rhat`` ``[E, 3]``.

Frame types:

* ``max`` (CrystalFramer): e1 = direction of the candidate with the largest attention logit;
  e2 = candidate maximising ``logit + log(max(1 - |cos(r, e1)|, 1e-5))`` among those not
  collinear with e1, Gram-Schmidt against e1; e3 = e1 x e2.
* ``static_local``: ``max`` with the q.k term removed, i.e. driven by ``-|r|^2 / (2 sigma^2)``
  alone: nearest image for e1, nearest non-collinear image (weighted by 1 - |cos|) for e2
  (distance ties broken by the full logit, see ``static_local_frames``).
* ``weighted_pca``: eigenvectors of ``sum_e w_e rhat rhat^T`` (largest eigenvalue first), each
  oriented towards the weighted mean direction (third moment when that vanishes), right-handed.
  Near-degenerate spectra (relative eigen-gap < ``eig_tol``) fall back to the ``max`` frame,
  which is rotation-covariant, for that atom and head.
* ``pca``: one frame per structure from the covariance of the unit-cell positions.  NOT
  invariant to the choice of cell (a supercell or other cell gives other positions); it is the
  paper's static baseline and is kept as such.  Degenerate spreads fall back to ``lattice``.
* ``lattice``: unit lattice vectors of the primitive lattice (``ndata["prim_lattice"]`` when
  present, else ``ndata["lattice"]``): e1 the shortest non-zero lattice vector, e2 the shortest
  one not parallel to e1 with e1.e2 >= 0, e3 the shortest non-coplanar one with e1.e3 >= 0; all
  flipped when left-handed.  Not orthogonalised.
* ``none``: no frame (plain Crystalformer); ``compute_frames`` returns None.

Candidates are all incoming edges except the self image (|r|^2 > 1e-5).  Ties (symmetric
crystals) are broken by invariant rules first (``static_local``: the full logit; e2 of ``max``
and ``static_local``: the turning sense about the weighted mean direction, see
``_max_style_frames``), then by the lowest edge index, which depends on atom order and cell.
Candidates still tied then are related by a site symmetry g.  If g is a rotation, both choices
give identical features.  If g is improper (a mirror, or a rotoinversion, of a site without
inversion), the two frames are (e1, e2, e3) and (g e1, g e2, -g e3): the e1 and e2 features
agree and the e3 cosines change sign.  The same holds for PCA axes whose sign no moment fixes
(``_orient``).  So the layer symmetrises the e3 angular features over c -> -c wherever ``tied``
is set, and every tie-break then gives the same result.

Known gap: ``lattice`` ties between equally short lattice vectors are broken by low-order
moments of the structure's edges (``lattice_axes``); these separate most candidates that only
the lattice, not the crystal, makes equivalent, but not all: on 1 of 40 sample crystals
(LiTaO3, R3c, given as a 1x2x2 supercell) the prediction changes by 1.2e-4 relative
(``python -m benchmarks.invariance``).
"""
from __future__ import annotations

import torch

from . import kernels as K
from . import sparse as S
from .basis import CANDIDATE_MIN_D2, TIE_TOL  # noqa: F401  (CANDIDATE_MIN_D2: part of this module's API)
from .config import FRAME_TYPES, FRAMES
from .errors import ConfigError
from .lattice import lattice_axes, normalize

# Axes whose angular features the layer symmetrises over c -> -c where ``tied`` is set (module
# doc), and the node data each frame type reads: columns of the table ``config.FRAMES``.
SYMMETRISED_AXES = {f.name: f.symmetrised_axes for f in FRAMES.values()}
NODE_INPUTS = {f.name: f.node_inputs for f in FRAMES.values()}
COLLINEAR_COS = 0.9999


def check_frame_type(kind: str) -> str:
    if kind not in FRAME_TYPES:
        raise ConfigError(f"unknown frame type {kind!r}; choose one of {', '.join(FRAME_TYPES)}")
    return kind


def _perpendicular(e1: torch.Tensor) -> torch.Tensor:
    """A deterministic unit vector perpendicular to each e1 (used only when every candidate is
    collinear with e1, where the e2/e3 cosines of all candidates vanish whatever e2 is)."""
    axis = torch.zeros_like(e1)
    axis.scatter_(-1, e1.abs().argmin(dim=-1, keepdim=True), 1.0)
    return normalize(torch.cross(e1, axis, dim=-1))


def _segment_argmax(topo: S.Topology, score: torch.Tensor, valid: torch.Tensor, tie_breakers=(), tie_tol: float = TIE_TOL):
    """For each destination node and head, the index of the incoming edge with the largest score.

    score, valid and each tie breaker: [E, H].  Returns (index [N, H] long, found [N, H] bool,
    tied [N, H] bool).  Edges within ``tie_tol`` of the maximum are narrowed down by maximising
    each tie breaker in turn; among those still tied the lowest edge index wins, and ``tied``
    says that this last, order-dependent rule was needed.
    """
    E = score.shape[0]
    neg = torch.finfo(score.dtype).min
    dst = topo.dst
    near = valid
    for values in (score, *tie_breakers):
        s = values.masked_fill(~near, neg)
        best = S.copy_e_max(topo, s)  # [N, H]
        near = near & (s >= (best - tie_tol * (1.0 + best.abs()))[dst])
    # lowest edge index among the near-best: maximise (E - index); float64 keeps indices exact
    rank = (E - torch.arange(E, device=score.device, dtype=torch.float64)).unsqueeze(-1).expand_as(score)
    rank = torch.where(near, rank, torch.zeros_like(rank))
    top = S.copy_e_max(topo, rank)  # [N, H], 0 where no valid candidate
    found = top > 0
    index = (E - top).long().clamp(0, max(E - 1, 0))
    tied = S.copy_e_sum(topo, near.to(score.dtype)) > 1.5
    return index, found, tied


def _max_style_frames(topo: S.Topology, score: torch.Tensor, rhat: torch.Tensor, candidate: torch.Tensor,
                      weights: torch.Tensor, secondary=None):
    """Shared by ``max`` and ``static_local``: pick e1, then e2 by score + log(1 - |cos|); ties
    in ``score`` are broken by ``secondary`` (same shape) when given.

    e2 ties need one more, geometric, rule.  Around a 3-fold axis, say, the neighbours a, b, c
    give six tied (e1, e2) pairs in two classes of opposite handedness ((a, b) ~ (b, c) ~ (c, a)
    and (a, c) ~ ...); without a mirror in the site symmetry the two classes give different
    features, and the edge index would pick the class by atom order.  So among tied e2 candidates
    the one turning counter-clockwise about m, the attention-weighted mean direction (a
    rotation-covariant vector that site symmetries fix), wins: maximise (e1 x r) . m.
    Returns (frames [N, H, 3, 3], tied [N, H]).  On CPU one fused numba kernel does all of it
    (``kernels.max_style_frames``, the same rules); elsewhere the torch operations below."""
    if K.use_numba_frames(score):
        return K.max_style_frames(topo.indptr, topo.order, score, secondary, rhat, candidate, weights, TIE_TOL,
                                  COLLINEAR_COS)
    # the comparisons in float64, as the numba kernel makes them: both paths pick the same edges
    dtype = rhat.dtype
    score, rhat, weights = score.double(), rhat.double(), weights.double()
    secondary = secondary.double() if secondary is not None else None
    E, H = score.shape
    valid = candidate.unsqueeze(-1).expand(-1, H)
    i1, found1, tied1 = _segment_argmax(topo, score, valid, () if secondary is None else (secondary,))
    e1 = rhat[i1]  # [N, H, 3]
    # no candidate at all (isolated atom): there is no angular term to orient, any axis will do
    x_axis = torch.zeros_like(e1)
    x_axis.select(-1, 0).fill_(1.0)  # on the device: a tensor from host data would be a blocking copy on a GPU
    e1 = torch.where(found1.unsqueeze(-1), e1, x_axis)

    r = rhat.view(E, 1, 3)
    mean_dir = S.edge_sum(topo, r, (weights * candidate.unsqueeze(-1)).unsqueeze(-1))  # [N, H, 3]
    # r . e1 and (e1 x r) . m = r . (m x e1), per edge and head: one SDDMM, no [E, H, 3] gathers
    dots = S.e_dot_v(topo, r, torch.cat([e1, torch.cross(mean_dir, e1, dim=-1)], 1)).view(E, 2, H)
    cos1, turn = dots[:, 0], dots[:, 1]
    valid2 = valid & (cos1.abs() < COLLINEAR_COS)
    penalty = torch.log((1.0 - cos1.abs()).clamp_min(1e-5))
    breakers = (turn,) if secondary is None else (secondary + penalty, turn)
    i2, found2, tied2 = _segment_argmax(topo, score + penalty, valid2, breakers)
    r2 = rhat[i2]
    e2 = normalize(r2 - (r2 * e1).sum(-1, keepdim=True) * e1)
    e2 = torch.where(found2.unsqueeze(-1), e2, _perpendicular(e1))
    e3 = torch.cross(e1, e2, dim=-1)
    return torch.stack([e1, e2, e3], dim=2).to(dtype), tied1 | (tied2 & found2)


def max_frames(topo: S.Topology, logits: torch.Tensor, rhat: torch.Tensor, candidate: torch.Tensor,
               weights: torch.Tensor):
    """``max`` frame from this layer's attention logits (and weights, for ties) [E, H]."""
    return _max_style_frames(topo, logits, rhat, candidate, weights)


def static_local_frames(topo: S.Topology, dist_logits: torch.Tensor, rhat: torch.Tensor, candidate: torch.Tensor,
                        logits: torch.Tensor, weights: torch.Tensor):
    """``static_local`` frame: the ``max`` rule on the distance term -|r|^2/(2 sigma^2) alone.
    Equidistant neighbours of different species are common (Heusler, rocksalt second shells) and
    not symmetry-related, so distance ties are broken by the full attention logit, which sees
    species: the choice then does not depend on atom order."""
    return _max_style_frames(topo, dist_logits, rhat, candidate, weights, secondary=logits)


def _orient(axes: torch.Tensor, first: torch.Tensor, third: torch.Tensor, tol: float = 1e-4):
    """Flip each axis so that its first moment (or, when that vanishes, third moment) is positive.

    Returns (axes, ambiguous [..., 3]): where both moments vanish the sign is arbitrary.  That
    happens when a site symmetry reverses the axis; the axis' own features are then the same
    either way and only the handedness of e3 can differ, which the layer symmetrises (``tied``).
    """
    ambiguous = (first.abs() <= tol) & (third.abs() <= tol)
    sign = torch.where(first.abs() > tol, first.sign(), third.sign())
    sign = torch.where(ambiguous | (sign == 0), torch.ones_like(sign), sign)
    return axes * sign.unsqueeze(-1), ambiguous


def weighted_pca_frames(topo: S.Topology, weights: torch.Tensor, rhat: torch.Tensor, candidate: torch.Tensor,
                        logits: torch.Tensor, eig_tol: float = 1e-3):
    """``weighted_pca`` frame from the attention weights [E, H] of this layer.
    Returns (frames, tied) where tied marks axes of arbitrary sign and the max-frame fallback's ties.

    On a GPU this frame makes the host wait twice per layer, unavoidably here: ``torch.linalg.eigh``
    (cuSOLVER's convergence status is read back) and ``degenerate.any()``, which decides whether the
    ``max`` fallback is computed at all (always computing it would cost a whole max frame per layer).
    ``max``, ``static_local``, ``lattice`` and ``none`` make none (tests/test_syncs.py)."""
    N, (E, H) = topo.num_nodes, weights.shape
    w = (weights * candidate.unsqueeze(-1)).unsqueeze(-1)  # [E, H, 1], self image excluded
    outer = (rhat.unsqueeze(-1) * rhat.unsqueeze(-2)).reshape(E, 1, 9)
    cov = S.edge_sum(topo, outer, w).reshape(N, H, 3, 3).double()
    evals, evecs = torch.linalg.eigh(cov)  # ascending; eigenvectors are the COLUMNS
    axes = evecs.flip(-1).transpose(-1, -2).to(weights.dtype)  # rows, largest eigenvalue first
    evals = evals.flip(-1)

    # orientation: towards the weighted mean direction, else by the weighted third moment
    mean_dir = S.edge_sum(topo, rhat.unsqueeze(1), w)  # [N, H, 3]
    first = (axes * mean_dir.unsqueeze(2)).sum(-1)  # [N, H, 3]
    proj = S.e_dot_v(topo, rhat.view(E, 1, 3), axes.reshape(N, H * 3, 3)).view(E, H, 3)
    third = S.edge_sum(topo, proj.pow(3), w)
    axes, ambiguous = _orient(axes, first, third)
    e1, e2 = axes[:, :, 0], axes[:, :, 1]
    frames = torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=2)

    # eigenvectors of (near-)equal eigenvalues are arbitrary: use the max frame there
    scale = evals[..., 0].clamp_min(1e-12)
    gaps = torch.stack([evals[..., 0] - evals[..., 1], evals[..., 1] - evals[..., 2]], -1) / scale.unsqueeze(-1)
    degenerate = (gaps < eig_tol).any(-1) | (evals[..., 0] < 1e-8)
    tied = ambiguous[..., :2].any(-1)
    if degenerate.any():  # one synchronisation per layer on a GPU, for a frame type that is rarely degenerate
        fallback, fallback_tied = max_frames(topo, logits, rhat, candidate, weights)
        frames = torch.where(degenerate[..., None, None], fallback, frames)
        tied = torch.where(degenerate, fallback_tied, tied)
    return frames, tied


def _per_node(topo: S.Topology, per_graph: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, ...] per structure -> [N, H, ...] per atom and head (a view, no copy over heads)."""
    return S.per_graph_to_nodes(topo, per_graph).unsqueeze(1).expand(-1, num_heads, *per_graph.shape[1:])


def pca_frames(topo: S.Topology, num_heads: int, pos_key: str = "pos", eig_tol: float = 1e-3):
    """``pca`` frame: principal axes of the unit-cell positions of each structure, oriented by
    their third moments.  Not cell-choice invariant, by construction (the paper's baseline).
    Where the spread is degenerate (one atom, collinear or coplanar-isotropic positions, cubic
    arrangements) the axes are arbitrary, so the ``lattice`` frame is used instead.
    Returns (frames [N, H, 3, 3], tied [N, H]: an axis of arbitrary sign).

    On a GPU ``torch.linalg.eigh`` makes the host wait once per layer (cuSOLVER's status), and
    ``degenerate.any()`` once more for graphs without a stored lattice frame (not built by
    ``build_graph``)."""
    if not topo.has_node_data(pos_key):
        raise KeyError(f"the 'pca' frame needs Cartesian positions in graph.ndata[{pos_key!r}]")
    pos = topo.node_data(pos_key).double()
    counts, seg, B = topo.batch_num_nodes, topo.node_graph, topo.batch_size
    centre = torch.zeros(B, 3, dtype=pos.dtype, device=pos.device).index_add_(0, seg, pos) / counts.unsqueeze(-1)
    x = pos - centre[seg]
    cov = torch.zeros(B, 3, 3, dtype=pos.dtype, device=pos.device).index_add_(0, seg, x.unsqueeze(-1) * x.unsqueeze(-2))
    evals, evecs = torch.linalg.eigh(cov)
    evals, axes = evals.flip(-1), evecs.flip(-1).transpose(-1, -2)  # rows, largest first
    proj = (axes[seg] * x.unsqueeze(1)).sum(-1)  # [N, 3]
    third = torch.zeros(B, 3, dtype=pos.dtype, device=pos.device).index_add_(0, seg, proj.pow(3))
    size = torch.zeros(B, 3, dtype=pos.dtype, device=pos.device).index_add_(0, seg, proj.abs().pow(3))
    axes, ambiguous = _orient(axes, torch.zeros_like(third), third / size.clamp_min(1e-12), tol=1e-5)
    e1, e2 = axes[:, 0], axes[:, 1]
    frames = torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=1)
    scale = evals[:, 0].clamp_min(1e-12)
    gaps = torch.stack([evals[:, 0] - evals[:, 1], evals[:, 1] - evals[:, 2]], -1) / scale.unsqueeze(-1)
    degenerate = (gaps < eig_tol).any(-1) | (evals[:, 0] < 1e-8)
    tied = ambiguous[:, :2].any(-1)
    # the stored lattice frame costs nothing: take it without asking (no device synchronisation)
    if topo.has_node_data("lattice_frame") or degenerate.any():
        lattice, lattice_tied = _lattice_axes(topo)
        frames = torch.where(degenerate[:, None, None], lattice, frames)
        tied = torch.where(degenerate, lattice_tied, tied)
    return _per_node(topo, frames, num_heads), _per_node(topo, tied, num_heads)


def _lattice_axes(topo: S.Topology):
    """([B, 3, 3] float64 lattice frame, [B] tied) per structure of a batch: the ones graph.py
    stored (``ndata["lattice_frame"]``), else from the lattice alone (see ``lattice_axes``)."""
    counts = topo.batch_num_nodes
    first = torch.cumsum(counts, 0) - counts  # first node of each graph
    if topo.has_node_data("lattice_frame"):
        return topo.node_data("lattice_frame")[first].double(), topo.node_data("lattice_tied")[first].bool()
    key = "prim_lattice" if topo.has_node_data("prim_lattice") else "lattice"
    if not topo.has_node_data(key):
        raise KeyError("the 'lattice' frame needs graph.ndata['lattice'] (rows = lattice vectors)")
    frames, tied = zip(*(lattice_axes(lat) for lat in topo.node_data(key)[first]))
    return torch.stack(frames), torch.tensor(tied, device=topo.device)


def lattice_frames(topo: S.Topology, num_heads: int):
    """``lattice`` frame: unit vectors of short primitive lattice vectors (not orthogonalised).
    Returns (frames [N, H, 3, 3], tied [N, H])."""
    frames, tied = _lattice_axes(topo)
    return _per_node(topo, frames, num_heads), _per_node(topo, tied, num_heads)


@torch.no_grad()
def compute_frames(kind: str, topo: S.Topology, rhat: torch.Tensor, candidate: torch.Tensor, logits: torch.Tensor,
                   weights: torch.Tensor, dist_logits: torch.Tensor):
    """Dispatch on the frame type.  Returns ``(frames, tied)``: frames [N, H, 3, 3] (rows = axes)
    and tied [N, H] bool (the choice of e1 or e2 was a tie), or ``(None, None)`` for ``none``.

    topo: the batch's ``sparse.Topology``; rhat: [E, 3] unit displacement (0 for the self image);
    candidate: [E] bool (not the self image); logits, weights, dist_logits: [E, H] attention
    logits, softmax weights, and the distance-only part of the logits.
    """
    return FRAME_FUNCTIONS[check_frame_type(kind)](topo, rhat, candidate, logits, weights, dist_logits)


def _global(frame_fn):
    """A per-structure frame (``pca``, ``lattice``) in the per-layer signature, in the layer's dtype."""
    def frames(topo, rhat, candidate, logits, weights, dist_logits):
        axes, tied = frame_fn(topo, logits.shape[1])
        return axes.to(rhat.dtype), tied
    return frames


# The function of each row of ``config.FRAMES``, all called as
# ``fn(topo, rhat, candidate, logits, weights, dist_logits) -> (frames, tied)``.
FRAME_FUNCTIONS = {
    "none": lambda topo, rhat, candidate, logits, weights, dist_logits: (None, None),
    "max": lambda topo, rhat, candidate, logits, weights, dist_logits: max_frames(topo, logits, rhat, candidate,
                                                                                  weights),
    "static_local": lambda topo, rhat, candidate, logits, weights, dist_logits: static_local_frames(
        topo, dist_logits, rhat, candidate, logits, weights),
    "weighted_pca": lambda topo, rhat, candidate, logits, weights, dist_logits: weighted_pca_frames(
        topo, weights, rhat, candidate, logits),
    "pca": _global(pca_frames),
    "lattice": _global(lattice_frames),
}
assert FRAME_FUNCTIONS.keys() == FRAMES.keys(), "config.FRAMES and frames.FRAME_FUNCTIONS list other frame types"
