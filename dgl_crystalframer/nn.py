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
from . import kernels as K
from . import sparse as S
from .frames import CANDIDATE_MIN_D2, SYMMETRISED_AXES, check_frame_type, compute_frames


class EdgeGeometry(NamedTuple):
    """Per-edge quantities shared by every layer and head of one forward pass."""

    dist2: torch.Tensor  # [E]   |r|^2
    rhat: torch.Tensor  # [E, 3] r / |r| (0 for the self image)
    candidate: torch.Tensor  # [E] bool, not the self image
    dist_basis: torch.Tensor  # [N, max_degree, K] b_dist(|r|) of each atom's edges (topo.pad), 0 where padded
    topo: S.Topology  # the edges grouped by destination atom, on the device, with the sparse backend


def edge_geometry(graph, rvec: torch.Tensor, num_dist_basis: int = B.DIST_BASIS_SIZE,
                  dist_basis_rmax: float = B.DIST_BASIS_RMAX, topo: Optional[S.Topology] = None,
                  backend=None) -> EdgeGeometry:
    """Compute what depends only on the graph and the displacement vectors, once per batch (no
    gradient: the bases are functions of the geometry, which is an input).  ``rvec``'s device
    is where the model runs; the graph may live elsewhere (a CPU DGLGraph with CUDA features).
    ``backend``: the sparse backend's name (None: chosen by the device, ``sparse.select_backend``)."""
    rvec = rvec.detach()
    if topo is None:
        topo = S.Topology.of(graph, rvec.device, backend)
    dist2 = (rvec * rvec).sum(-1)
    candidate = dist2 > CANDIDATE_MIN_D2
    dist = dist2.sqrt()
    rhat = torch.where(candidate.unsqueeze(-1), rvec / dist.clamp_min(1e-12).unsqueeze(-1), torch.zeros_like(rvec))
    return EdgeGeometry(dist2, rhat, candidate, topo.pad(B.gaussian_distance_basis(dist, num_dist_basis, dist_basis_rmax)),
                        topo)


class _DistAggregate(torch.autograd.Function):
    """A[i, h, :] = sum_{e -> i} w[e, h] * b_dist[e, :]  ->  [N, H, K].

    With each atom's edges padded to one row (``Topology.pad``), forward is one batched matmul
    ``w_pad^T @ b_pad`` and backward needs only dL/dw (the basis is a constant):
    ``dL/dw = unpad(b_pad @ dL/dA^T)``.  Neither pass forms the [E, H, K] product.
    basis: [N, max_degree, K] (padded once per batch, ``EdgeGeometry.dist_basis``); weight: [E, H].
    """

    @staticmethod
    def forward(ctx, topo, basis, weight):
        ctx.topo = topo
        ctx.save_for_backward(basis)
        return torch.bmm(topo.pad(weight).transpose(1, 2), basis)

    @staticmethod
    def backward(ctx, grad_out):
        (basis,) = ctx.saved_tensors
        return None, None, ctx.topo.unpad(torch.bmm(basis, grad_out.transpose(1, 2)))


class _AngularAggregate(torch.autograd.Function):
    """y[i, h, :] = sum_k W_kh sum_{e -> i} w[e, h] * b_angl(cos[e, h, k])  ->  [N, H, d_head].

    b_angl is a piecewise polynomial (``basis.angle_basis_table``, error ~4e-8), so that
    sum_e w_e b(c_e) = sum_{s, m} hist[s, m] * table[s, m], with hist the per-(atom, head, axis)
    histogram of the moments w_e t_e^m over the S segments (``kernels.histogram``): M numbers
    scattered per (edge, head, axis) instead of D exponentials.  The table is projected first,
    P[h, k] = table @ W_kh^T  ([S*M, d_head]), so one batched matmul per chunk of atoms gives y.
    Where ``sym`` [N, H, 3] is set the feature is symmetrised over c -> -c (tied frames, see the
    layer).  Atoms are processed in chunks so that each histogram stays cache-sized (edges sorted
    by destination, ``indptr`` [N + 1]).  Backward keeps ``cos`` and the histograms
    (H * 3 * S * M floats per atom, ~20x fewer than its ~80 edges' [E, H, 3, D] basis values):
    dL/dP = hist^T dL/dy and dL/dw = sum_k sum_m t^m (dL/dy @ P^T)[s, m]
    (``kernels.histogram_transpose``).
    Cosines carry no gradient (frames and directions are constants).
    """

    @staticmethod
    def forward(ctx, indptr, cos, weight, sym, proj, half, hist_budget, mirror_axes=(0, 1, 2)):
        N, H = indptr.shape[0] - 1, cos.shape[1]
        SM, dh = proj.shape[2], proj.shape[3]  # proj: [H, 3, S*M, d_head]
        S, M = 2 * half, SM // (2 * half)
        cos, weight, sym = cos.contiguous(), weight.contiguous(), sym.contiguous()
        proj = proj.reshape(H, 3 * SM, dh)
        out = cos.new_empty(N, H, dh)
        chunks = _node_chunks(indptr, cos.shape[0], hist_budget // (H * 3 * SM))
        hists = []
        for chunk in chunks:
            hist = K.histogram(indptr, cos, weight, sym, chunk, half, S, M, mirror_axes)  # [H, n, 3*S*M]
            out[chunk[0]:chunk[1]] = torch.bmm(hist, proj).transpose(0, 1)
            hists.append(hist)
        ctx.hists = hists  # intermediates, not inputs or outputs: no save_for_backward needed
        ctx.save_for_backward(indptr, cos, sym, proj)
        ctx.meta = (half, S, M, chunks, mirror_axes)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        indptr, cos, sym, proj = ctx.saved_tensors
        half, S, M, chunks, mirror_axes = ctx.meta
        grad_w = cos.new_empty(cos.shape[:2])
        grad_proj = torch.zeros_like(proj)
        for chunk, hist in zip(chunks, ctx.hists):
            g = grad_out[chunk[0]:chunk[1]].transpose(0, 1)  # [H, n, d_head]
            K.histogram_transpose(indptr, cos, sym, torch.bmm(g, proj.transpose(1, 2)), chunk, half, S, M, grad_w,
                                  mirror_axes)
            grad_proj.baddbmm_(hist.transpose(1, 2), g)
        return None, None, grad_w, None, grad_proj.view(proj.shape[0], 3, S * M, -1), None, None, None


def _node_chunks(indptr: torch.Tensor, num_edges: int, nodes_per_chunk: int):
    """[(n0, n1, e0, e1)]: ranges of at most ``nodes_per_chunk`` (>= 1) atoms and their edges.
    On a GPU one chunk holds everything (the histograms fit, and chunk bounds would have to be
    read back from the device)."""
    num_nodes = indptr.shape[0] - 1
    if indptr.device.type != "cpu":
        return [(0, num_nodes, 0, num_edges)]
    step = max(1, nodes_per_chunk)
    starts = list(range(0, num_nodes, step))
    bounds = indptr[starts + [num_nodes]].tolist()
    return [(n0, min(num_nodes, n0 + step), bounds[k], bounds[k + 1]) for k, n0 in enumerate(starts)]


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

    Kernels (``sparse.py``, DGL's or plain PyTorch): q.k is an SDDMM (``u_dot_v``), the softmax is
    ``edge_softmax``, the value sum an SpMM (``u_mul_e_sum``); the distance sum is a batched matmul
    over each atom's padded edge list (``_DistAggregate``), and the angular sum evaluates b_a as a
    piecewise polynomial through per-atom histograms of moments (error ~4e-8, see
    ``_AngularAggregate``; a fused numba kernel on CPU, ``kernels.py``); on CPU the frames are one
    fused numba pass as well.

    Memory (forward + backward, per edge, H heads, D angular / K distance Gaussians): the layer
    keeps at most about ``H * (8 + 3)`` floats per edge for backward (logits, weights, softmax
    output, cosines), plus the shared [E, K] distance basis once per batch.  Neither the
    [E, H, K] nor the [E, H, 3, D] basis products are ever formed; the angular work lives in
    per-atom histograms (H * 3 * 240 floats per atom at D=64, kept for backward), filled
    ``hist_budget`` floats at a time.  Measured (``python -m benchmarks.perf``, scaling section): a
    whole training step of the 4-layer default model peaks at about 0.5 KB per edge above the
    resting process.

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
        sigma parametrisation (docs/METHOD.md 2.1); sigma < r0 / sqrt(b).
    rvec_key : str
        ``graph.edata`` key of the displacement vectors (source image minus destination), used when
        ``forward`` gets no ``rvec`` (see the sign convention above).
    hist_budget : int
        Floats per chunk of the angular histogram (atoms are processed in chunks of this size).
    symmetrize_ties : bool
        Average the e3 angular features (all three for ``lattice``) over c -> -c where the frame
        choice was a tie that only an index could break (see :mod:`~dgl_crystalframer.frames`).
        Needed for exact invariance on such sites; False keeps the chosen frame's features.

    Shapes
    ------
    graph: N nodes, E edges (periodic images, j -> i).  feat: [N, d].  rvec: [E, 3].
    Returns [N, d], and with ``get_attention=True`` also the attention weights [E, H, 1].
    """

    def __init__(self, in_feats: int, num_heads: int, frame: str = "max", *,
                 num_dist_basis: int = B.DIST_BASIS_SIZE, dist_basis_rmax: float = B.DIST_BASIS_RMAX,
                 num_angle_basis: int = B.ANGLE_BASIS_SIZE, angle_basis_width: float = B.ANGLE_BASIS_WIDTH,
                 c_dist: float = 1.0, c_angl: float = 1.0, r0: float = B.R0, b: float = B.B, beta: float = B.BETA,
                 rvec_key: str = "rvec", hist_budget: int = 1 << 20, symmetrize_ties: bool = True):
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
        self.sparse_backend: Optional[str] = None  # dgl | torch | None (by device): see sparse.select_backend

        d, H, dh = in_feats, num_heads, self.head_dim
        self.fc_q, self.fc_k, self.fc_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc_out = nn.Linear(d, d)
        self.sigma_weight = nn.Parameter(torch.empty(H, dh))
        self.dist_proj = nn.Parameter(torch.empty(H * dh, num_dist_basis))  # W0, all heads stacked
        if frame != "none":
            self.angle_proj = nn.Parameter(torch.empty(3, H * dh, num_angle_basis))  # W1..W3
            if num_angle_basis < 2:
                raise ValueError(f"num_angle_basis must be >= 2, got {num_angle_basis}")
            table, self.angle_half = B.angle_basis_table(num_angle_basis, angle_basis_width)
            self.register_buffer("angle_table", table.float(), persistent=False)  # follows .to(device/dtype)
            self.mirror_axes = tuple(SYMMETRISED_AXES[frame]) if symmetrize_ties else ()
            axes = torch.zeros(3, dtype=torch.bool)
            axes[list(self.mirror_axes)] = True
            self.register_buffer("symmetrised_axes", axes, persistent=False)
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
        self._sigma_ready = False
        self._proj_cache = None

    def extra_repr(self) -> str:
        return (f"in_feats={self.in_feats}, num_heads={self.num_heads}, frame={self.frame!r}, "
                f"K={self.num_dist_basis}, D={self.num_angle_basis}, rvec_key={self.rvec_key!r}")

    def _sigma_inv2(self, q: torch.Tensor) -> torch.Tensor:
        """1 / (2 sigma^2) per atom and head, [N, H]."""
        s = (q * self.sigma_weight).sum(-1)  # [N, H], q includes its bias, before 1/sqrt(d_head)
        # the buffer is read once (a GPU synchronisation), then remembered on the Python side
        if self.training and not self._sigma_ready and not bool(self.sigma_initialized):
            with torch.no_grad():
                self.sigma_shift.copy_(-s.mean())
                self.sigma_scale.copy_(1.0 / s.std(unbiased=False).clamp_min(1e-6))
                self.sigma_initialized.fill_(True)
        self._sigma_ready = self._sigma_ready or self.training
        x = (s + self.sigma_shift) * self.sigma_scale
        rho = (1 - self.b) * F.elu(self.beta * x / (1 - self.b)) + 1.0
        return rho / (2 * self.r0 ** 2)

    def _angle_projection(self) -> torch.Tensor:
        """The basis table projected by W1..W3: P[h, k] = table @ W_kh^T, [H, 3, S*M, d_head].
        Without autograd (prediction) it is kept until the weights change: a fixed cost per call
        that small batches would otherwise pay in every layer."""
        H, dh = self.num_heads, self.head_dim
        key = (self.angle_proj._version, self.angle_proj.data_ptr(), self.angle_table.data_ptr())
        if not torch.is_grad_enabled() and self._proj_cache is not None and self._proj_cache[0] == key:
            return self._proj_cache[1]
        wk = self.angle_proj.view(3, H, dh, self.num_angle_basis)
        proj = torch.einsum("xm,khdm->hkxd", self.angle_table.flatten(0, 1), wk)
        self._proj_cache = (key, proj) if not torch.is_grad_enabled() else None
        return proj

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sigma_ready = False  # read the loaded sigma_initialized again

    def _attention(self, graph, feat: torch.Tensor, rvec: Optional[torch.Tensor], geometry: Optional[EdgeGeometry]):
        """Values, attention logits / weights and the frames: everything before aggregation."""
        if rvec is None and geometry is None:
            if self.rvec_key not in graph.edata:
                raise KeyError(f"CrystalFramerConv: graph.edata has no {self.rvec_key!r}; pass rvec= or set rvec_key "
                               f"(edata keys: {list(graph.edata.keys())})")
            rvec = graph.edata[self.rvec_key]
        if rvec is not None and rvec.shape != (graph.num_edges(), 3):
            raise ValueError(f"rvec must be [num_edges={graph.num_edges()}, 3], got {tuple(rvec.shape)}")
        if feat.shape != (graph.num_nodes(), self.in_feats):
            raise ValueError(f"feat must be [num_nodes={graph.num_nodes()}, in_feats={self.in_feats}], got {tuple(feat.shape)}")
        if geometry is None:
            geometry = edge_geometry(graph, rvec.to(feat.device, feat.dtype), self.num_dist_basis, self.dist_basis_rmax,
                                     backend=self.sparse_backend)
        topo = geometry.topo
        N, H, dh = feat.shape[0], self.num_heads, self.head_dim
        q = self.fc_q(feat).view(N, H, dh)
        k = self.fc_k(feat).view(N, H, dh)
        v = self.fc_v(feat).view(N, H, dh)
        inv2 = self._sigma_inv2(q)  # [N, H]
        dist_logits = -S.e_mul_v(topo, geometry.dist2.unsqueeze(-1), inv2)  # [E, H]
        logits = S.u_dot_v(topo, k, q).squeeze(-1) / math.sqrt(dh) + dist_logits
        weights = S.edge_softmax(topo, logits)  # [E, H]
        frames = tied = None
        if self.angle_proj is not None:
            frames, tied = compute_frames(self.frame, topo, geometry.rhat, geometry.candidate,
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
        per-batch edge quantities (``edge_geometry(graph, rvec)``), computed here when not given.
        ``graph`` is a DGLGraph or a :class:`~dgl_crystalframer.batch.CrystalBatch`; it may live on
        another device than ``feat`` (the computation runs on ``feat``'s, see ``sparse``)."""
        with graph.local_scope():
            geometry, v, weights, frames, tied = self._attention(graph, feat, rvec, geometry)
            topo = geometry.topo
            N, H, dh = v.shape
            w = weights.unsqueeze(-1)
            y = S.u_mul_e_sum(topo, v, w)  # [N, H, dh]
            agg_dist = _DistAggregate.apply(topo, geometry.dist_basis, weights)  # [N, H, K]
            w0 = self.dist_proj.view(H, dh, self.num_dist_basis)
            y = y + self.c_dist * torch.einsum("nhk,hdk->nhd", agg_dist, w0)

            if frames is not None:
                # cos[e, h, k] = e_k(dst(e), h) . rhat_e, 0 for the self image (an SDDMM)
                E = geometry.rhat.shape[0]
                cos = S.e_dot_v(topo, geometry.rhat.view(E, 1, 3), frames.reshape(N, H * 3, 3)).view(E, H, 3)
                w_ang = weights * geometry.candidate.unsqueeze(-1)  # the self image has no direction
                if topo.order is not None:
                    cos, w_ang = cos[topo.order], w_ang[topo.order]
                # tied frame choices differ at most by the signs of some cosines (frames.py):
                # the features of those axes are symmetrised over c -> -c there
                sym = tied.unsqueeze(-1) & self.symmetrised_axes  # [N, H, 3]
                proj = self._angle_projection()  # [H, 3, S*M, dh]
                y = y + self.c_angl * _AngularAggregate.apply(topo.indptr, cos, w_ang, sym, proj, self.angle_half,
                                                              self.hist_budget, self.mirror_axes)

            out = self.fc_out(y.reshape(N, H * dh))
            if get_attention:
                return out, w
            return out
