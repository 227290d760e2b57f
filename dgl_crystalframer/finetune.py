"""Fine-tuning: a training run that starts from a checkpoint's weights (``TrainConfig.init_from``).

The checkpoint decides the architecture (its ``ModelConfig``) and the graph cutoff; a model setting
or cutoff that disagrees with it is an error, not an override.  The target normaliser is not taken
over: the trainer fits a fresh one on the new training targets, as for any run.  ``freeze_blocks``
N >= 1 freezes the species embedding and the first N attention blocks (their parameters get no
gradient and are left out of the optimiser); the blocks above and the head train.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from .checkpoint import load_checkpoint
from .config import MODEL_FIELDS, MODEL_PRESETS, TrainConfig
from .errors import ConfigError, UserError
from .graph_cache import sha256_file


def load_initial(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, meta) of a checkpoint to start from; any unreadable file is one ConfigError line."""
    try:
        model, meta = load_checkpoint(path)  # read safely; its errors never advise unsafe loading
    except (UserError, OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"init_from {path}: cannot start from it ({text})") from None
    return model.state_dict(), meta


def requested_architecture(cfg: TrainConfig) -> Dict[str, Tuple[Any, str]]:
    """The model settings a config asks for explicitly, each with where it comes from: its model
    preset's, then every set field."""
    wanted = {k: (v, f" (model {cfg.model_preset})") for k, v in MODEL_PRESETS.get(cfg.model_preset or "", {}).items()}
    wanted.update({k: (getattr(cfg, k), "") for k in MODEL_FIELDS if getattr(cfg, k) is not None})
    return wanted


def with_checkpoint_architecture(cfg: TrainConfig, meta: Dict[str, Any]) -> TrainConfig:
    """``cfg`` with the model fields and the cutoff of the checkpoint ``meta``; ConfigError on a conflict."""
    arch = meta["model_config"]
    clashes = [f"{k} {v!r}{why} (the checkpoint has {arch[k]!r})" for k, (v, why) in requested_architecture(cfg).items()
               if k in arch and arch[k] != v]
    cutoff = meta.get("cutoff")
    if cfg.cutoff is not None and cutoff is not None and abs(float(cfg.cutoff) - float(cutoff)) > 1e-9:
        clashes.append(f"cutoff {cfg.cutoff!r} (the checkpoint has {cutoff!r})")
    if clashes:
        raise ConfigError(f"init_from {cfg.init_from}: the architecture comes from the checkpoint, but the settings ask "
                          f"for {'; '.join(clashes)}; drop those settings")
    filled = cfg.with_overrides(**{k: arch[k] for k in MODEL_FIELDS if k in arch}, cutoff=cutoff)
    layers = filled.model_config().num_layers
    if filled.freeze_blocks > layers:
        raise ConfigError(f"freeze_blocks {filled.freeze_blocks}: the checkpoint {cfg.init_from} has only {layers} blocks")
    return filled


def checkpoint_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` completed from its ``init_from`` checkpoint (unchanged without one)."""
    if not cfg.init_from:
        return cfg
    return with_checkpoint_architecture(cfg, load_initial(cfg.init_from)[1])


def freeze(model: torch.nn.Module, blocks: int) -> List[str]:
    """Freeze the embedding and the first ``blocks`` attention blocks; the names of the frozen parameters."""
    if blocks <= 0:
        return []
    modules = [("embedding", model.embedding)] + [(f"blocks.{i}", model.blocks[i]) for i in range(blocks)]
    names = []
    for prefix, module in modules:
        for name, p in module.named_parameters():
            p.requires_grad_(False)
            names.append(f"{prefix}.{name}")
    return names


def provenance(path: str, meta: Dict[str, Any], frozen: List[str], n_frozen_values: int) -> Dict[str, Any]:
    """Where a fine-tuned run's starting weights came from (results.json and its checkpoints' meta)."""
    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path), "dataset": meta.get("dataset"),
            "target": meta.get("target"), "unit": meta.get("unit"), "kind": meta.get("kind"),
            "epoch": meta.get("epoch"), "frozen_parameters": frozen, "frozen_values": n_frozen_values}


def check_cutoff(meta: Dict[str, Any], cutoff: Optional[float], path: str) -> None:
    """The graphs a fine-tuning run trains on must be built with the checkpoint's cutoff."""
    want = meta.get("cutoff")
    if want is not None and cutoff is not None and abs(float(want) - float(cutoff)) > 1e-6:
        raise ConfigError(f"init_from {path}: the data's graphs use cutoff {cutoff:.4g} A, the checkpoint's model "
                          f"was trained with {float(want):.4g} A; load the data with cutoff={float(want)!r}")


__all__ = ["check_cutoff", "checkpoint_config", "freeze", "load_initial", "provenance", "requested_architecture",
           "with_checkpoint_architecture"]
