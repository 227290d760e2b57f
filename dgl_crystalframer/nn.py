"""CrystalFramerConv: periodic (infinitely connected) attention with attention-derived frames.

Drop it into any DGL crystal model whose graph has one edge per periodic image (j, n) -> i::

    from dgl_crystalframer.nn import CrystalFramerConv
    conv = CrystalFramerConv(in_feats=64, num_heads=4, frame="max", rvec_key="r")
    h = conv(graph, h)          # graph.edata["r"]: [E, 3] vectors from i to the image of j
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import basis as B
from ._dgl import dglops, edge_softmax
from .frames import CANDIDATE_MIN_D2, SYMMETRISED_AXES, check_frame_type, compute_frames, edge_to_node_block


class EdgeGeometry(NamedTuple):
    """Per-edge quantities shared by every layer and head of one forward pass."""

    dist2: torch.Tensor  # [E]   |r|^2
    rhat: torch.Tensor  # [E, 3] r / |r| (0 for the self image)
    candidate: torch.Tensor  # [E] bool, not the self image
    dist_basis: torch.Tensor  # [E, K] b_dist(|r|)
    dst: torch.Tensor  # [E] destination atom of each edge
    block: object  # DGL block edge -> destination atom, for the fused per-atom sums
    order: Optional[torch.Tensor]  # [E] edges sorted by destination, None if they already are


def edge_geometry(graph, rvec: torch.Tensor, num_dist_basis: int = B.DIST_BASIS_SIZE,
                  dist_basis_rmax: float = B.DIST_BASIS_RMAX) -> EdgeGeometry:
    """Compute what depends only on the graph and the displacement vectors, once per batch (no
    gradient: the bases are functions of the geometry, which is an input)."""
    rvec = rvec.detach()
    dist2 = (rvec * rvec).sum(-1)
    candidate = dist2 > CANDIDATE_MIN_D2
    dist = dist2.sqrt()
    rhat = torch.where(candidate.unsqueeze(-1), rvec / dist.clamp_min(1e-12).unsqueeze(-1), torch.zeros_like(rvec))
    dst = graph.edges()[1]
    unsorted = bool((dst[1:] < dst[:-1]).any())  # the angular histogram chunks need edges grouped by atom
    return EdgeGeometry(dist2, rhat, candidate, B.gaussian_distance_basis(dist, num_dist_basis, dist_basis_rmax),
                        dst, edge_to_node_block(dst, graph.num_nodes()),
                        torch.argsort(dst, stable=True) if unsorted else None)


class _DistAggregate(torch.autograd.Function):
    """A[i, h, :] = sum_{e -> i} w[e, h] * b_dist[e, :]  ->  [N, H, K]  (block: edge -> atom).

    Forward is DGL's broadcasting SpMM.  Backward needs only dL/dw (the basis is a constant), as
    one fused SDDMM dot product; DGL's generic backward would form [E, H, K] and sum it (4x slower).
    """

    @staticmethod
    def forward(ctx, block, basis, weight):
        ctx.block = block
        ctx.save_for_backward(basis)
        return dglops.gspmm(block, "mul", "sum", basis.unsqueeze(1), weight.unsqueeze(-1))

    @staticmethod
    def backward(ctx, grad_out):
        (basis,) = ctx.saved_tensors
        grad_w = dglops.gsddmm(ctx.block, "dot", basis.unsqueeze(1), grad_out.contiguous(), "u", "v")
        return None, None, grad_w.squeeze(-1)


class _AngularAggregate(torch.autograd.Function):
    """A[i, h, k, :] = sum_{e -> i} w[e, h] * b_angl(cos[e, h, k])  ->  [N, H, 3, D].

    The basis is interpolated from a table (``basis.angle_basis_table``, error ~1e-7), so that
    sum_e w_e b(c_e) = sum_g hist[g] * table[g] with hist the per-atom histogram of the Hermite
    weights w_e * coef_e on 4 grid rows per (edge, head, axis): a scatter of 4 numbers instead of D
    exponentials, then a dense [rows, 2G] x [2G, D] matmul.  Atoms are processed in chunks (edges
    sorted by destination) so that each histogram stays cache-sized; nothing per edge is saved for
    backward but ``cos``, where dL/dw = sum_k sum_taps coef * (dL/dA @ table^T)[tap].
    Cosines carry no gradient (frames and directions are constants).
    """

    @staticmethod
    def forward(ctx, dst, num_nodes, cos, weight, table, step, hist_budget):
        H, D, G = cos.shape[1], table.shape[1], table.shape[0] // 2
        out = cos.new_empty(num_nodes, H, 3, D)
        chunks = _node_chunks(dst, num_nodes, max(1, hist_budget // (H * 3 * 2 * G)))
        for n0, n1, e0, e1 in chunks:
            idx, coef = _hist_taps(dst[e0:e1] - n0, cos[e0:e1], step, G)
            vals = coef.mul_(weight[e0:e1, :, None, None])
            rows = (n1 - n0) * H * 3
            hist = torch.bincount(idx.view(-1), vals.view(-1), minlength=rows * 2 * G)
            out[n0:n1] = (hist.view(rows, 2 * G) @ table).view(n1 - n0, H, 3, D)
        ctx.save_for_backward(dst, cos, table)
        ctx.meta = (step, chunks)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        dst, cos, table = ctx.saved_tensors
        step, chunks = ctx.meta
        D, G = table.shape[1], table.shape[0] // 2
        grad_w = cos.new_zeros(cos.shape[:2])
        for n0, n1, e0, e1 in chunks:
            gtab = grad_out[n0:n1].reshape(-1, D) @ table.T  # [rows, 2G]: dL/dhist
            idx, coef = _hist_taps(dst[e0:e1] - n0, cos[e0:e1], step, G)
            grad_w[e0:e1] = (gtab.view(-1)[idx] * coef).sum((-1, -2))
        return None, None, None, grad_w, None, None, None


def _hist_taps(dst_local: torch.Tensor, cos: torch.Tensor, step: float, G: int):
    """Flat histogram positions [E, H, 3, 4] of the 4 Hermite taps and their weights [E, H, 3, 4]."""
    E, H, _ = cos.shape
    j, coef = B.hermite_taps(cos, step, G)
    row = dst_local.view(E, 1, 1) * (H * 3) + torch.arange(H * 3, device=cos.device).view(1, H, 3)
    base = (row * (2 * G) + j).unsqueeze(-1)
    return base + base.new_tensor([0, 1, G, G + 1]), coef


def _node_chunks(dst: torch.Tensor, num_nodes: int, nodes_per_chunk: int):
    """[(n0, n1, e0, e1)]: atom ranges and the (contiguous) ranges of their incoming edges."""
    bounds = list(range(0, num_nodes, nodes_per_chunk)) + [num_nodes]
    edge_bounds = torch.searchsorted(dst, torch.tensor(bounds, dtype=dst.dtype, device=dst.device)).tolist()
    return [(bounds[c], bounds[c + 1], edge_bounds[c], edge_bounds[c + 1]) for c in range(len(bounds) - 1)]


class CrystalFramerConv(nn.Module):
    r"""Periodic multi-head attention with frame-projected angular value encoding.

    For destination atom :math:`i`, every incoming edge :math:`e = (j, n) \to i` (one per periodic
    image, self image included) carries :math:`r_e = p_j + L^\top n - p_i`.  Per head :math:`h`:

    .. math::
        \mathrm{logit}_e &= \frac{q_{ih} \cdot k_{jh}}{\sqrt{d_h}} - \frac{|r_e|^2}{2\sigma_{ih}^2},
        \qquad w_e = \operatorname{softmax}_{e \to i}(\mathrm{logit}_e) \\
        \sigma_{ih} &= r_0 / \sqrt{\rho(x_{ih})},\quad \rho(x) = (1-b)\,\mathrm{ELU}(\beta x/(1-b)) + 1,
        \quad x_{ih} = (q_{ih}\cdot w^\sigma_h + \text{shift}) \cdot \text{scale} \\
        y_{ih} &= \sum_e w_e v_{jh}
                 + c_d W^0_h \sum_e w_e\, b_d(|r_e|)
                 + c_a \sum_{k=1}^3 W^k_h \sum_{e \ne \text{self}} w_e\, b_a(e^{(k)}_{ih}\cdot \hat r_e)

    and :math:`\mathrm{out}_i = W_o [y_{i1}; \dots; y_{iH}] + b_o`.  ``shift``/``scale`` are recorded
    from the first training batch and frozen (buffers).  :math:`e^{(k)}_{ih}` is the frame of
    atom i and head h (``frame``, see :mod:`dgl_crystalframer.frames`); ``frame="none"`` drops
    the angular term (plain Crystalformer).  The basis sums are aggregated per node first and
    projected once per node (linearity), so no per-edge projected features are ever formed.

    Kernels: q.k is an SDDMM (``u_dot_v``), the softmax is ``edge_softmax``, the value and distance
    sums are SpMMs (``u_mul_e_sum``, ``gspmm`` over an edge->atom block, backward by SDDMM ``dot``)
    and the angular sum interpolates b_a from a table (error ~1e-7, see ``_AngularAggregate``).

    Memory (forward + backward, per edge, H heads, D angular / K distance Gaussians): the layer
    keeps at most about ``H * (8 + 3)`` floats per edge for backward (logits, weights, softmax
    output, cosines), plus the shared [E, K] distance basis once per batch.  Neither the
    [E, H, K] nor the [E, H, 3, D] basis products are ever formed; the angular work lives in
    per-atom histograms of at most ``hist_budget`` floats at a time, and transient [E, H, 3, 4]
    tap weights.  Measured (``python -m benchmarks.perf``, scaling section): a whole training
    step of the 4-layer default model peaks at about 0.6 KB per edge above the resting process.

    Sign convention: ``rvec`` points from the destination atom to the source image.  The opposite
    sign (-r for every edge) is the mirror image of the crystal: distances and attention are the
    same and only handedness-dependent (e3) features change, so a wrong sign trains without
    error on mirrored crystals.  For graphs whose edges point the other way (source = centre
    atom), pass ``rvec=-graph.edata[key]`` when the neighbour relation is symmetric, or use
    ``dgl.reverse(graph, copy_edata=True)``.  Gradients do not flow into ``rvec`` (the geometry is
    an input; this layer is for property prediction, not forces).

    Parameters
    ----------
    in_feats : int
        Node feature size d (also the output size).  Must be divisible by ``num_heads``.
    num_heads : int
        Number of heads H; d_head = d / H.
    frame : str
        ``none``, ``max``, ``weighted_pca``, ``static_local``, ``pca`` or ``lattice``.
    num_dist_basis, dist_basis_rmax : int, float
        K Gaussians on |r| with centres k*rmax/K, k=1..K.
    num_angle_basis, angle_basis_width : int, float
        D Gaussians on [-1, 1] with width ``angle_basis_width * 2/(D-1)``.
    c_dist, c_angl : float
        Scales of the distance and angular value encodings.
    r0, b, beta : float
        sigma parametrisation (SPEC.md 2.1); sigma < r0 / sqrt(b).
    rvec_key : str
        ``graph.edata`` key of the displacement vectors (source image minus destination), used when
        ``forward`` gets no ``rvec`` (see the sign convention above).
    hist_budget : int
        Floats per chunk of the angular histogram (atoms are processed in chunks of this size).

    Shapes
    ------
    graph: N nodes, E edges (periodic images, j -> i).  feat: [N, d].  rvec: [E, 3].
    Returns [N, d], and with ``get_attention=True`` also the attention weights [E, H, 1].
    """

    def __init__(self, in_feats: int, num_heads: int, frame: str = "max", *,
                 num_dist_basis: int = B.DIST_BASIS_SIZE, dist_basis_rmax: float = B.DIST_BASIS_RMAX,
                 num_angle_basis: int = B.ANGLE_BASIS_SIZE, angle_basis_width: float = B.ANGLE_BASIS_WIDTH,
                 c_dist: float = 1.0, c_angl: float = 1.0, r0: float = B.R0, b: float = B.B, beta: float = B.BETA,
                 rvec_key: str = "rvec", hist_budget: int = 1 << 20):
        super().__init__()
        if in_feats % num_heads:
            raise ValueError(f"in_feats={in_feats} is not divisible by num_heads={num_heads}")
        self.in_feats, self.num_heads, self.head_dim = in_feats, num_heads, in_feats // num_heads
        self.frame = check_frame_type(frame)
        self.num_dist_basis, self.dist_basis_rmax = num_dist_basis, dist_basis_rmax
        self.num_angle_basis, self.angle_basis_width = num_angle_basis, angle_basis_width
        self.c_dist, self.c_angl = c_dist, c_angl
        self.r0, self.b, self.beta = r0, b, beta
        self.rvec_key, self.hist_budget = rvec_key, hist_budget

        d, H, dh = in_feats, num_heads, self.head_dim
        self.fc_q, self.fc_k, self.fc_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc_out = nn.Linear(d, d)
        self.sigma_weight = nn.Parameter(torch.empty(H, dh))
        self.dist_proj = nn.Parameter(torch.empty(H * dh, num_dist_basis))  # W0, all heads stacked
        if frame != "none":
            self.angle_proj = nn.Parameter(torch.empty(3, H * dh, num_angle_basis))  # W1..W3
            if num_angle_basis < 2:
                raise ValueError(f"num_angle_basis must be >= 2, got {num_angle_basis}")
            table, self.angle_step = B.angle_basis_table(num_angle_basis, angle_basis_width)
            self.register_buffer("angle_table", table.float(), persistent=False)  # follows .to(device/dtype)
        else:
            self.register_parameter("angle_proj", None)
        # sigma normaliser: recorded on the first training batch, then frozen
        self.register_buffer("sigma_shift", torch.zeros(()))
        self.register_buffer("sigma_scale", torch.ones(()))
        self.register_buffer("sigma_initialized", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()

    def reset_parameters(self):
        """Xavier-uniform projections with zero biases, W0/Wk with gain (#basis)^-1/2, and a fresh
        sigma normaliser (re-recorded on the next training batch)."""
        for lin in (self.fc_q, self.fc_k, self.fc_v, self.fc_out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.sigma_weight, std=self.head_dim ** -0.5)
        nn.init.xavier_uniform_(self.dist_proj, gain=self.num_dist_basis ** -0.5)
        if self.angle_proj is not None:
            for k in range(3):
                nn.init.xavier_uniform_(self.angle_proj[k], gain=self.num_angle_basis ** -0.5)
        self.sigma_shift.zero_()
        self.sigma_scale.fill_(1.0)
        self.sigma_initialized.fill_(False)

    def extra_repr(self) -> str:
        return (f"in_feats={self.in_feats}, num_heads={self.num_heads}, frame={self.frame!r}, "
                f"K={self.num_dist_basis}, D={self.num_angle_basis}, rvec_key={self.rvec_key!r}")

    def _sigma_inv2(self, q: torch.Tensor) -> torch.Tensor:
        """1 / (2 sigma^2) per atom and head, [N, H]."""
        s = (q * self.sigma_weight).sum(-1)  # [N, H], q includes its bias, before 1/sqrt(d_head)
        if self.training and not bool(self.sigma_initialized):
            with torch.no_grad():
                self.sigma_shift.copy_(-s.mean())
                self.sigma_scale.copy_(1.0 / s.std(unbiased=False).clamp_min(1e-6))
                self.sigma_initialized.fill_(True)
        x = (s + self.sigma_shift) * self.sigma_scale
        rho = (1 - self.b) * F.elu(self.beta * x / (1 - self.b)) + 1.0
        return rho / (2 * self.r0 ** 2)

    def _attention(self, graph, feat: torch.Tensor, rvec: Optional[torch.Tensor], geometry: Optional[EdgeGeometry]):
        """Values, attention logits / weights and the frames: everything before aggregation."""
        if rvec is None:
            if self.rvec_key not in graph.edata:
                raise KeyError(f"CrystalFramerConv: graph.edata has no {self.rvec_key!r}; pass rvec= or set rvec_key "
                               f"(edata keys: {list(graph.edata.keys())})")
            rvec = graph.edata[self.rvec_key]
        if rvec.shape != (graph.num_edges(), 3):
            raise ValueError(f"rvec must be [num_edges={graph.num_edges()}, 3], got {tuple(rvec.shape)}")
        if feat.shape != (graph.num_nodes(), self.in_feats):
            raise ValueError(f"feat must be [num_nodes={graph.num_nodes()}, in_feats={self.in_feats}], got {tuple(feat.shape)}")
        if geometry is None:
            geometry = edge_geometry(graph, rvec.to(feat.dtype), self.num_dist_basis, self.dist_basis_rmax)
        N, H, dh = feat.shape[0], self.num_heads, self.head_dim
        q = self.fc_q(feat).view(N, H, dh)
        k = self.fc_k(feat).view(N, H, dh)
        v = self.fc_v(feat).view(N, H, dh)
        inv2 = self._sigma_inv2(q)  # [N, H]
        dist_logits = -dglops.e_mul_v(graph, geometry.dist2.unsqueeze(-1), inv2)  # [E, H]
        logits = dglops.u_dot_v(graph, k, q).squeeze(-1) / math.sqrt(dh) + dist_logits
        weights = edge_softmax(graph, logits)  # [E, H]
        frames = tied = None
        if self.angle_proj is not None:
            frames, tied = compute_frames(self.frame, graph, geometry.rhat, geometry.candidate,
                                          logits.detach(), weights.detach(), dist_logits.detach())
        return geometry, v, weights, frames, tied

    @torch.no_grad()
    def frames(self, graph, feat: torch.Tensor, rvec: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The frames this layer uses for ``feat``: [N, H, 3, 3], rows are the axes e1, e2, e3
        (None for ``frame="none"``).  For inspection and tests; ``forward`` computes them itself."""
        with graph.local_scope():
            return self._attention(graph, feat, rvec, None)[3]

    def forward(self, graph, feat: torch.Tensor, rvec: Optional[torch.Tensor] = None,
                get_attention: bool = False, geometry: Optional[EdgeGeometry] = None):
        """feat: [N, d]; rvec: [E, 3] or None (read ``graph.edata[rvec_key]``); geometry: shared
        per-batch edge quantities (``edge_geometry(graph, rvec)``), computed here when not given."""
        with graph.local_scope():
            geometry, v, weights, frames, tied = self._attention(graph, feat, rvec, geometry)
            N, H, dh = v.shape
            w = weights.unsqueeze(-1)
            y = dglops.u_mul_e_sum(graph, v, w)  # [N, H, dh]
            dst = geometry.dst
            agg_dist = _DistAggregate.apply(geometry.block, geometry.dist_basis, weights)  # [N, H, K]
            w0 = self.dist_proj.view(H, dh, self.num_dist_basis)
            y = y + self.c_dist * torch.einsum("nhk,hdk->nhd", agg_dist, w0)

            if frames is not None:
                cos = torch.einsum("ehkc,ec->ehk", frames[dst], geometry.rhat)  # [E, H, 3], 0 for self
                w_ang = weights * geometry.candidate.unsqueeze(-1)  # the self image has no direction
                if geometry.order is not None:
                    dst, cos, w_ang = dst[geometry.order], cos[geometry.order], w_ang[geometry.order]
                agg_ang = _AngularAggregate.apply(dst, N, cos, w_ang, self.angle_table, self.angle_step,
                                                  self.hist_budget)
                # tied frame choices differ at most by the signs of some cosines (frames.py):
                # symmetrise there; the basis centres are symmetric, so b(-c) is b(c) reversed
                axes = torch.zeros(3, dtype=torch.bool, device=tied.device)
                axes[list(SYMMETRISED_AXES.get(self.frame, (2,)))] = True
                mask = (tied.unsqueeze(-1) & axes).unsqueeze(-1)  # [N, H, 3, 1]
                agg_ang = torch.where(mask, 0.5 * (agg_ang + agg_ang.flip(-1)), agg_ang)
                wk = self.angle_proj.view(3, H, dh, self.num_angle_basis)
                y = y + self.c_angl * torch.einsum("nhkm,khdm->nhd", agg_ang, wk)

            out = self.fc_out(y.reshape(N, H * dh))
            if get_attention:
                return out, w
            return out
