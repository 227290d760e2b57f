"""Checkpoints of the authors' code (github.com/omron-sinicx/crystalframer): a PyTorch Lightning
checkpoint of its ``models/regression.py`` -> this package's model, ``ModelConfig`` and meta
(docs/METHOD.md 9).

Three tables carry the conversion, each checked against the official code (commit 0921650):

* ``SETTINGS``: every ``hyper_parameters`` entry that shapes the network, either mapped to a
  ``ModelConfig`` field or required to hold the one value this package implements (anything else
  stops the load with one line naming the setting and its value);
* ``NAME_RULES``: the official state-dict names (the same for its CPU encoder
  ``IndexedLatticeformerEncoder`` and its CUDA encoder ``CrystalformerEncoderCUDA``, whose tree
  adds ``proj_angle1..3``) -> our parameter names, with the reshapes;
* ``AXIS_ORDER``: which official angular projection feeds which of our frame axes.

Every official tensor is consumed exactly once and every tensor of ours is filled, with equal
shapes, or the load stops naming the tensor.  Plain Python and torch: nothing of the official code
is imported (the checkpoint is a dict of tensors and plain values, read by ``checkpoint.py``).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from . import basis as B
from .config import FRAME_TYPES, ModelConfig, model_config
from .errors import ConfigError, UserError
from .model import CrystalFramer
from .datasets import dataset_spec


class OfficialCheckpointError(UserError):
    """An official checkpoint that cannot be converted (a setting or tensor this package lacks)."""


LIGHTNING_KEYS = ("state_dict", "hyper_parameters")
WEIGHT_PREFIXES = {"swa": "swa_model.module.", "model": "model."}  # the weight average, the live model

# What the official code assumes when a key is missing from hyper_parameters (older checkpoints):
# the getattr defaults of models/latticeformer.py and the LatticeformerParams defaults.
OFFICIAL_DEFAULTS: Dict[str, Any] = {
    "num_layers": 4, "model_dim": 128, "ff_dim": 512, "head_num": 8, "k_dim": 0, "v_dim": 0, "dropout": 0.1,
    "t_fixup_init": True, "t_activation": "relu", "pooling": "max", "pre_pooling_op": "w+bn+relu", "norm_type": "bn",
    "scale_grad": 0.0, "domain": "real", "lattice_range": 4, "minimum_range": True, "adaptive_cutoff_sigma": -3.5,
    "gauss_lb_real": 0.5, "scale_real": [1.4], "normalize_gauss": True, "gauss_state": "q", "positive_func_beta": 0.1,
    "value_pe_dist_real": 64, "value_pe_dist_coef": 1.0, "value_pe_dist_max": -10.0, "value_pe_dist_wscale": 1.0,
    "value_pe_wave_real": 0, "value_pe_angle_real": 16, "value_pe_angle_coef": 1.0, "value_pe_angle_wscale": 4.0,
    "frame_method": "max", "cos_abs": 1, "symm_break_noise": 1e-5, "use_cgcnn_feat": False,
}

# Settings that must hold the value this package implements: name -> (accepted values, what else means).
REQUIRED: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "encoder_name": (("latticeformer",), "another encoder"),
    "domain": (("real",), "reciprocal-space or multi-domain attention"),
    "use_cgcnn_feat": ((False,), "CGCNN atom features instead of one-hot species"),
    "gauss_state": (("q",), "another source of the Gaussian width"),
    "t_activation": (("relu",), "another FFN activation"),
    "t_fixup_init": ((True,), "LayerNorm blocks (the official code drops LayerNorm only with T-Fixup)"),
    "pooling": (("avr",), "another readout than the mean"),
    "pre_pooling_op": (("no",), "a projection (with batch norm) before pooling"),
    "norm_type": (("no", "id"), "normalisation layers (batch, layer, instance norm) in the head"),
    "value_pe_wave_real": ((0,), "plane-wave value encodings"),
    "cos_abs": ((0,), "an angular basis on |cos|"),
    "value_pe_dist_wscale": ((1.0,), "another width of the distance Gaussians"),
    "gauss_lb_real": ((B.B,), "another lower bound b of rho (docs/METHOD.md 2.1)"),
    "positive_func_beta": ((B.BETA,), "another slope beta of rho (docs/METHOD.md 2.1)"),
}
# Settings that only steer the official CUDA kernels' sums (box of cells per atom, random tie noise):
# this package truncates at a sphere and breaks ties deterministically (docs/METHOD.md 8); and
# scale_grad, which rescales gradients only (training, like the learning rate).  The reciprocal-space
# settings (gauss_lb_reci, scale_reci, value_pe_*_reci) are unused with domain "real".
IGNORED = ("lattice_range", "minimum_range", "symm_break_noise", "reproduciblity_state", "use_cuda_code", "scale_grad")

# official frame_method -> our frame type (frames exist only where value_pe_angle_real > 0)
FRAME_METHODS = {"max": "max", "max_static": "static_local", "weighted_pca": "weighted_pca", "lattice": "lattice",
                 "pca": "pca"}
# Our angular projection of axis k is the official proj_angle{AXIS_ORDER[frame][k] + 1}: its PCA
# frame takes eigenvector columns in ascending eigenvalue order (models/cuda_funcs/calc_pca_frame.py),
# ours largest first; the other frames order their axes as ours (e1 from the best candidate).
AXIS_ORDER = {"pca": (2, 1, 0)}

# official dataset (target_set, up to its '-' suffix) -> ours, for the target's name and unit
TARGET_SETS = {"jarvis__dft_3d_2021": "dft_3d_2021", "jarvis__megnet": "megnet", "jarvis__oqmd_3d": "oqmd_3d"}  # ours


def is_official(ckpt: Any) -> bool:
    """A PyTorch Lightning checkpoint of the official RegressionModel (Latticeformer encoder)?"""
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in LIGHTNING_KEYS):
        return False
    hp, sd = ckpt["hyper_parameters"], ckpt["state_dict"]
    return (isinstance(hp, dict) and hp.get("encoder_name") == "latticeformer" and isinstance(sd, dict)
            and any(str(k).startswith("model.encoder.layers.") for k in sd))


def settings(hyper_parameters: Mapping[str, Any], overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The official settings: the checkpoint's hyper_parameters over the official defaults, then
    ``overrides`` (official names, e.g. ``{"value_pe_angle_coef": 4.0}`` as demo.sh runs)."""
    hp = {**OFFICIAL_DEFAULTS, **dict(hyper_parameters)}
    for key, value in (overrides or {}).items():
        if key not in hp:
            raise ConfigError(f"override {key!r} is not a setting of the official model "
                              f"(e.g. value_pe_angle_coef, value_pe_dist_coef, frame_method)")
        hp[key] = value
    return hp


def _same_value(value: Any, accepted: Any) -> bool:
    """Equal, with booleans told apart from numbers (True is not the setting 1)."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    return value == accepted


def _fail(name: str, value: Any, why: str) -> OfficialCheckpointError:
    return OfficialCheckpointError(f"official setting {name}={value!r} is not supported ({why})")


def convert_settings(hp: Mapping[str, Any]) -> Tuple[ModelConfig, float]:
    """Official settings -> (ModelConfig, graph cutoff in Angstrom); raises on a setting we lack."""
    for name, (accepted, why) in REQUIRED.items():
        value = hp.get(name)
        if not any(_same_value(value, a) for a in accepted):
            raise _fail(name, value, why)
    dim, heads = int(hp["model_dim"]), int(hp["head_num"])
    for name in ("k_dim", "v_dim"):  # per-head sizes; 0 means model_dim / head_num
        if int(hp[name]) not in (0, dim // heads):
            raise _fail(name, hp[name], "per-head sizes other than model_dim / head_num")
    scale_real = hp["scale_real"] if isinstance(hp["scale_real"], (list, tuple)) else [hp["scale_real"]]
    if any(not math.isclose(float(s), B.R0) for s in scale_real):
        raise _fail("scale_real", hp["scale_real"], f"another sigma scale r0 than {B.R0} A (docs/METHOD.md 2.1)")
    embedding = hp.get("embedding_dim")
    if list(embedding or []) != [dim]:
        raise _fail("embedding_dim", embedding, f"a head other than Linear({dim}, {dim}) -> ReLU -> Linear({dim}, 1)")
    targets = hp.get("targets")
    if not isinstance(targets, str) and len(targets or []) != 1:
        raise _fail("targets", targets, "several targets in one model")
    if int(hp["value_pe_dist_real"]) < 1:
        raise _fail("value_pe_dist_real", hp["value_pe_dist_real"], "no distance encoding")
    angles = int(hp["value_pe_angle_real"])
    if angles > 0 and hp["frame_method"] not in FRAME_METHODS:
        raise _fail("frame_method", hp["frame_method"], f"frame types here: {', '.join(FRAME_METHODS)}")
    frame = FRAME_METHODS[hp["frame_method"]] if angles > 0 else "none"
    n_sigma = abs(float(hp["adaptive_cutoff_sigma"]))  # < 0: n * sigma_ih per atom and head; > 0: n * sigma_max
    if n_sigma == 0:
        raise _fail("adaptive_cutoff_sigma", hp["adaptive_cutoff_sigma"], "a fixed box of lattice_range cells")
    rmax = float(hp["value_pe_dist_max"])
    fields = dict(frame=frame, num_layers=int(hp["num_layers"]), dim=dim, num_heads=heads, ffn_dim=int(hp["ff_dim"]),
                  num_dist_basis=int(hp["value_pe_dist_real"]), dist_basis_rmax=-rmax * B.R0 if rmax < 0 else rmax,
                  c_dist=float(hp["value_pe_dist_coef"]), dropout=float(hp["dropout"]))
    if frame != "none":
        fields.update(num_angle_basis=angles, angle_basis_width=float(hp["value_pe_angle_wscale"]),
                      c_angl=float(hp["value_pe_angle_coef"]))
    assert frame in FRAME_TYPES
    # The official kernels sum, per atom and head, the images within n_sigma * sigma_ih (a box of
    # cells around that sphere); the sphere of n_sigma * sigma_max contains all of them.
    return model_config(**fields), B.default_cutoff(B.R0, B.B, n_sigma)


# ---------------------------------------------------------------------------------------------
# state dict

def _same(t, like, hp, frame):
    return t


def _as(t, like, hp, frame):  # the same numbers in our layout (e.g. [1, H, dh, K] -> [H * dh, K])
    return t.reshape(like.shape) if like is not None and t.numel() == like.numel() else t


def _split3(t, likes, hp, frame):  # in_proj_bias = [b_q; b_k; b_v]
    return tuple(t.reshape(3, -1)) if t.numel() % 3 == 0 else (t, t, t)


def _sigma_normaliser(t, likes, hp, frame):
    """gauss_scale = [scale, shift], recorded on the first training batch: x = (alpha + shift) * scale."""
    if not hp["normalize_gauss"]:  # no normaliser: the identity, fixed
        return t.new_zeros(()), t.new_ones(()), torch.tensor(True)
    scale, shift = t.reshape(-1)[:2]
    if not scale > 0:
        raise OfficialCheckpointError("the official checkpoint's sigma normaliser (gauss_scale) was never recorded "
                                      "(an untrained model): its predictions would depend on the batch")
    return shift.clone(), scale.clone(), torch.tensor(True)


# (official name after the prefix, our name(s) with {0}, {1} from the groups, transform); the
# angular projections go to one of our tensors, slot AXIS_ORDER-dependent (see _convert_state).
L = r"encoder\.layers\.(\d+)\."
NAME_RULES: Tuple[Tuple[str, Any, Callable], ...] = (
    (r"input_embeddings\.weight", "embedding.weight", _same),
    (L + r"self_attn\.q_proj_weight", "blocks.{0}.attn.fc_q.weight", _same),
    (L + r"self_attn\.k_proj_weight", "blocks.{0}.attn.fc_k.weight", _same),
    (L + r"self_attn\.v_proj_weight", "blocks.{0}.attn.fc_v.weight", _same),
    (L + r"self_attn\.in_proj_bias", ("blocks.{0}.attn.fc_q.bias", "blocks.{0}.attn.fc_k.bias", "blocks.{0}.attn.fc_v.bias"),
     _split3),
    (L + r"self_attn\.out_proj\.(weight|bias)", "blocks.{0}.attn.fc_out.{1}", _same),
    (L + r"self_attn\.lattice_pos_weights", "blocks.{0}.attn.sigma_weight", _as),  # [H * dh] -> [H, dh]
    (L + r"self_attn\.gauss_scale", ("blocks.{0}.attn.sigma_shift", "blocks.{0}.attn.sigma_scale",
                                     "blocks.{0}.attn.sigma_initialized"), _sigma_normaliser),
    (L + r"self_attn\.atten_scale", (), None),  # never read by the official forward
    (L + r"self_attn\.pe_dist_proj", "blocks.{0}.attn.dist_proj", _as),  # [1, H, dh, K] -> [H * dh, K]
    (L + r"self_attn\.proj_angle([123])", "blocks.{0}.attn.angle_proj", _as),  # [1, H, dh, D] -> slot of [3, H * dh, D]
    (L + r"linear1\.(weight|bias)", "blocks.{0}.ffn.0.{1}", _same),
    (L + r"linear2\.(weight|bias)", "blocks.{0}.ffn.2.{1}", _same),
    (r"mlp\.0\.(weight|bias)", "head.0.{0}", _same),  # mlp = [Linear, Identity (norm_type no), ReLU, Linear]
    (r"mlp\.3\.(weight|bias)", "head.2.{0}", _same),
)
_RULES = tuple((re.compile(p + r"\Z"), target, fn) for p, target, fn in NAME_RULES)


def _convert_state(official: Dict[str, torch.Tensor], ours: Dict[str, torch.Tensor], hp: Mapping[str, Any],
                   frame: str, label: str) -> Dict[str, torch.Tensor]:
    """Official weights (prefix removed) -> a complete state dict for ``ours`` (its current state)."""
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}
    angle_slots: Dict[str, Dict[int, torch.Tensor]] = {}
    order = AXIS_ORDER.get(frame, (0, 1, 2))

    def put(name: str, value: torch.Tensor, origin: str):
        if name not in ours:
            raise OfficialCheckpointError(f"{label}: tensor {origin} has no counterpart in a {frame!r} model "
                                          f"(expected {name})")
        if name in source:
            raise OfficialCheckpointError(f"{label}: tensors {source[name]} and {origin} both map to {name}")
        if tuple(value.shape) != tuple(ours[name].shape):
            raise OfficialCheckpointError(f"{label}: tensor {origin} has shape {tuple(value.shape)}, "
                                          f"the model needs {tuple(ours[name].shape)} for {name}")
        out[name], source[name] = value.to(ours[name].dtype), origin

    for key, tensor in official.items():
        for pattern, target, fn in _RULES:
            m = pattern.match(key)
            if m:
                break
        else:
            raise OfficialCheckpointError(f"{label}: unexpected tensor {key} in the official state dict")
        if fn is None:
            continue
        groups = m.groups()
        if "proj_angle" in key:  # one of three slots of our angular projection
            name = target.format(*groups)
            if name not in ours:
                raise OfficialCheckpointError(f"{label}: tensor {key} (angular projection) but the model has no frames "
                                              f"(value_pe_angle_real={hp['value_pe_angle_real']})")
            slot = order.index(int(groups[-1]) - 1)
            like = ours[name][slot]
            if tensor.numel() != like.numel():
                raise OfficialCheckpointError(f"{label}: tensor {key} has shape {tuple(tensor.shape)}, "
                                              f"the model needs {tuple(like.shape)} per axis")
            angle_slots.setdefault(name, {})[slot] = tensor.reshape(like.shape)
            continue
        names = (target,) if isinstance(target, str) else target
        names = tuple(n.format(*groups) for n in names)
        likes = [ours.get(n) for n in names]
        value = fn(tensor, likes[0] if len(names) == 1 else likes, hp, frame)
        for name, v in zip(names, (value,) if len(names) == 1 else value):
            put(name, v, key)
    for name, slots in angle_slots.items():
        if sorted(slots) != [0, 1, 2]:
            missing = [f"proj_angle{order[s] + 1}" for s in range(3) if s not in slots]
            raise OfficialCheckpointError(f"{label}: {name} misses the official {', '.join(missing)}")
        put(name, torch.stack([slots[k] for k in range(3)]), f"{name.replace('blocks', 'layers')} proj_angle1..3")
    missing = [n for n in ours if n not in out]
    if missing:
        raise OfficialCheckpointError(f"{label}: the official state dict does not fill {missing[0]}"
                                      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return out


def _target(hp: Mapping[str, Any]) -> Tuple[str, str, str]:
    """(target name, unit, dataset) in this package's terms where known, else the official names."""
    official = hp["targets"] if isinstance(hp["targets"], str) else hp["targets"][0]
    target_set = str(hp.get("target_set") or "")
    ours = TARGET_SETS.get(target_set.split("-")[0])
    spec = dataset_spec(ours) if ours else None
    if spec is not None:
        try:
            key = spec.resolve_target(official)
            return key, spec.targets[key].unit, ours
        except UserError:
            pass
    return official, "", target_set or "official"


def convert(ckpt: Dict[str, Any], label: str = "checkpoint", weights: Optional[str] = None,
            overrides: Optional[Mapping[str, Any]] = None) -> Tuple[CrystalFramer, Dict[str, Any]]:
    """An official checkpoint dict -> (model, meta) as ``checkpoint.load_checkpoint`` returns them.

    ``weights``: ``"swa"`` (the weight average, the default when present) or ``"model"`` (the live
    weights).  ``overrides``: official setting names -> values applied over the checkpoint's own.
    """
    hp = settings(ckpt["hyper_parameters"], overrides)
    try:
        config, cutoff = convert_settings(hp)
    except OfficialCheckpointError as exc:
        raise OfficialCheckpointError(f"{label}: {exc}") from None
    state = ckpt["state_dict"]
    # AveragedModel copies the model when training starts and averages from swa_epochs before the end
    # on: a checkpoint saved before that (a best-epoch one) holds the initial weights under swa_model.
    averaged = int(state["swa_model.n_averaged"]) if "swa_model.n_averaged" in state else None
    has_swa = any(k.startswith(WEIGHT_PREFIXES["swa"]) for k in state)
    if weights is None:
        weights = "swa" if has_swa and averaged != 0 else "model"
    if weights not in WEIGHT_PREFIXES:
        raise ConfigError(f"weights must be {' or '.join(WEIGHT_PREFIXES)}, got {weights!r}")
    if weights == "swa" and averaged == 0:
        raise OfficialCheckpointError(f"{label}: its weight average was never updated (swa_model.n_averaged 0, "
                                      "saved before the averaging epochs): use the live weights (weights='model')")
    prefix = WEIGHT_PREFIXES[weights]
    chosen = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not chosen:
        raise OfficialCheckpointError(f"{label} has no {weights!r} weights (no tensors under {prefix!r})")
    # everything else must be known: the other weight set, the average's count, the target normaliser
    others = tuple(p for p in WEIGHT_PREFIXES.values() if p != prefix) + ("swa_model.n_averaged", "target_mean", "target_std")
    stray = [k for k in state if not k.startswith(prefix) and not k.startswith(others)]
    if stray:
        raise OfficialCheckpointError(f"{label}: unexpected tensor {stray[0]} in the official state dict")
    for key in ("target_mean", "target_std"):
        if key not in state or state[key].numel() != 1:
            raise OfficialCheckpointError(f"{label}: the official state dict needs a one-target {key} buffer")

    model = CrystalFramer(config)
    model.load_state_dict(_convert_state(chosen, model.state_dict(), hp, config.frame, label))
    model.eval()
    target, unit, dataset = _target(hp)
    meta = {
        "model_config": config.as_dict(), "target": target, "unit": unit, "cutoff": cutoff,
        "normalizer": {"mean": float(state["target_mean"].reshape(-1)[0]), "std": float(state["target_std"].reshape(-1)[0])},
        "dataset": dataset, "frame": config.frame, "kind": "official", "epoch": ckpt.get("epoch"), "val_mae": None,
        "official": {"weights": weights, "n_averaged": averaged,
                     "overrides": dict(overrides or {}), "targets": hp["targets"], "target_set": hp.get("target_set"),
                     "frame_method": hp["frame_method"], "lightning_version": ckpt.get("pytorch-lightning_version"),
                     "settings": {k: hp[k] for k in sorted(set(REQUIRED) | set(IGNORED) | {
                         "num_layers", "model_dim", "head_num", "ff_dim", "value_pe_dist_real", "value_pe_dist_max",
                         "value_pe_dist_coef", "value_pe_angle_real", "value_pe_angle_wscale", "value_pe_angle_coef",
                         "adaptive_cutoff_sigma", "scale_real", "normalize_gauss", "dropout"}) if k in hp}},
    }
    return model, meta


__all__ = ["AXIS_ORDER", "FRAME_METHODS", "NAME_RULES", "OFFICIAL_DEFAULTS", "OfficialCheckpointError", "REQUIRED",
           "convert", "convert_settings", "is_official", "settings"]
