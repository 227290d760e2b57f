"""Gaussian bases of docs/METHOD.md 2.2 and the constants that fix the attention's reach.

Pure torch (no DGL): a distance basis on |r| and an angular basis on cosines.

The Gaussian attention factor exp(-|r|^2 / (2 sigma^2)) has sigma < SIGMA_MAX = R0 / sqrt(B)
(docs/METHOD.md 2.1), so images farther than N_SIGMA * SIGMA_MAX carry negligible weight.  That is
where the default neighbour cutoff comes from: it is derived, never typed in.
"""
from __future__ import annotations

import math

import torch

from .config import ModelConfig

R0 = 1.4  # Angstrom: sigma at rho = 1
B = 0.5  # lower bound of rho, so sigma < R0 / sqrt(B)
BETA = 0.1  # slope of rho at 0
N_SIGMA = 3.5  # images within N_SIGMA * SIGMA_MAX are kept (as the reference implementation)
SIGMA_MAX = R0 / math.sqrt(B)

_DEFAULTS = ModelConfig()  # the basis sizes are model hyperparameters, declared there once
DIST_BASIS_SIZE = _DEFAULTS.num_dist_basis  # K
DIST_BASIS_RMAX = _DEFAULTS.dist_basis_rmax  # Angstrom
ANGLE_BASIS_SIZE = _DEFAULTS.num_angle_basis  # D (16 in the lightweight variant)
ANGLE_BASIS_WIDTH = _DEFAULTS.angle_basis_width  # s_a (1 in the lightweight variant)
CANDIDATE_MIN_D2 = 1e-5  # |r|^2 below this is the self image (no direction, never a frame axis)
TIE_TOL = 1e-4  # relative: scores this close are a tie (frame and lattice-axis selection)


def default_cutoff(r0: float = R0, b: float = B, n_sigma: float = N_SIGMA) -> float:
    """Neighbour cutoff (Angstrom) implied by the sigma bound: n_sigma * r0 / sqrt(b) (~6.93 A)."""
    return n_sigma * r0 / math.sqrt(b)


def gaussian_distance_basis(dist: torch.Tensor, size: int = DIST_BASIS_SIZE, r_max: float = DIST_BASIS_RMAX) -> torch.Tensor:
    """b_dist(|r|): ``size`` Gaussians with centres k * r_max / size, k = 1..size, width r_max / size.

    dist: [E] -> [E, size].  The first centre is r_max / size, not 0 (docs/METHOD.md 2.2).
    """
    step = r_max / size
    centres = torch.arange(1, size + 1, device=dist.device, dtype=dist.dtype)  # in units of step
    # In place, and with the exponent clamped where the Gaussian is below float32's smallest normal
    # number: denormal results made this 5-10x slower on CPU (their value, < 1e-38, is kept as 1e-38).
    return torch.sub((dist / step).unsqueeze(-1), centres).square_().mul_(-0.5).clamp_(min=-87.0).exp_()


def gaussian_angle_basis(cos: torch.Tensor, size: int = ANGLE_BASIS_SIZE, width: float = ANGLE_BASIS_WIDTH) -> torch.Tensor:
    """b_angl(cos): ``size`` Gaussians on [-1, 1], centres -1 + 2m/(size-1), width ``width`` * 2/(size-1).

    cos: [...] -> [..., size], as exp(-((c - mu) * a)^2) with a = 1 / (sqrt(2) * width * spacing).
    The definition; the layer evaluates it through ``angle_basis_table`` (per-edge values for
    every head, axis and centre would be the largest tensor of the model).
    """
    a = 1.0 / (math.sqrt(2.0) * width * 2.0 / (size - 1))
    centres = torch.linspace(-a, a, size, device=cos.device, dtype=cos.dtype)
    return torch.sub((cos * a).unsqueeze(-1), centres).square_().neg_().exp_()


# The angular basis is smooth on the scale of its width sigma, so the layer evaluates it as a
# piecewise polynomial: [-1, 1] is cut into S = 2 * half equal segments of about sigma / 2.5, and
# on each segment every Gaussian is a degree-5 polynomial in the position t in [0, 1) within the
# segment (least squares at Chebyshev nodes, float64).  Error ~4e-8 for the default basis and the
# lightweight one (b <= 1; tests/test_basis.py), i.e. at float32 resolution.  Then
# sum_e w_e b(c_e) = sum_{s, m} hist[s, m] * table[s, m] with hist[s, m] = sum_{e in segment s} w_e t_e^m:
# 6 moments scattered per edge, head and axis and one small dense matmul, instead of D
# exponentials (nn._AngularAggregate, kernels.py).
SEGMENTS_PER_WIDTH = 2.5
ANGLE_POLY_DEGREE = 5


def angle_basis_table(size: int = ANGLE_BASIS_SIZE, width: float = ANGLE_BASIS_WIDTH,
                      segments_per_width: float = SEGMENTS_PER_WIDTH, degree: int = ANGLE_POLY_DEGREE):
    """b_angl as a piecewise polynomial -> ``(table [S, degree + 1, size] float64, half)``.

    Segment s covers [-1 + s / half, -1 + (s + 1) / half], S = 2 * half (symmetric about 0), and
    b(c) = sum_m table[s, m] * t^m with t = (c + 1) * half - s (``angle_segments``).
    """
    sigma = width * 2.0 / (size - 1)
    half = math.ceil(segments_per_width / sigma)
    nodes = 4 * (degree + 1)  # Chebyshev nodes in [0, 1], well over the degree: a near-minimax fit
    x = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes)
    vander = x.unsqueeze(-1) ** torch.arange(degree + 1, dtype=torch.float64)  # [nodes, degree + 1]
    left = torch.arange(2 * half, dtype=torch.float64) / half - 1.0
    values = gaussian_angle_basis(left[:, None] + x[None] / half, size, width)  # [S, nodes, size]
    table = torch.linalg.lstsq(vander.expand(2 * half, -1, -1), values).solution
    return table, half


def angle_segments(cos: torch.Tensor, half: int):
    """Segment index (int64) and position t in [0, 1] of each cosine on the grid of ``angle_basis_table``
    (values outside [-1, 1] are clamped)."""
    u = ((cos + 1.0) * half).clamp_(0, 2 * half)
    s = u.floor().clamp_(max=2 * half - 1)
    return s.long(), u - s
