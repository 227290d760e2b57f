"""Checkpoints: the file format, atomic writes, and loading a trained model back.

A checkpoint is a dict ``{"format": "dgl_crystalframer/checkpoint", "version", "model": state_dict,
"meta": {...}}`` (plus ``train_state`` in ``last.pt``), readable with ``torch.load(weights_only=True)``.
``meta`` carries what predicting needs: the ``ModelConfig`` (``model_config``), the target name and
unit, the ``normalizer`` (``targets.Normalizer``), the graph ``cutoff``, and the dataset and frame.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .errors import CheckpointError
from .model import build_model
from .sparse import resolve_device

CHECKPOINT_FORMAT = "dgl_crystalframer/checkpoint"
CHECKPOINT_VERSION = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a reader (or a resumed run) never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that a reader never sees a partial file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load any checkpoint this module writes (model.pt, best.pt, swa.pt, last.pt) -> (model in eval mode, meta).

    ``meta`` holds ``target``, ``unit``, ``normalizer`` ({"mean", "std"}: prediction in original
    units = model(bg) * std + mean), ``cutoff`` (the graph cutoff the model was trained with),
    ``model_config``, ``dataset``, ``frame``, ``kind`` and ``epoch``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable dgl_crystalframer checkpoint ({load_error_reason(exc)})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a dgl_crystalframer checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    model = build_model(ckpt["meta"]["model_config"])
    model.load_state_dict(ckpt["model"])
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, dict(ckpt["meta"])


def read_checkpoint(path: str | Path) -> Dict[str, Any]:
    """The dict of a checkpoint this module wrote (``last.pt`` for a resume included), read safely.

    Every failure is one ``CheckpointError`` naming the file and why (``load_error_reason``);
    a missing file is a ``FileNotFoundError``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: {load_error_reason(exc)}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a dgl_crystalframer checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    return ckpt


def load_error_reason(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words.  Never torch's own advice to
    load with ``weights_only=False``: a checkpoint may come from anywhere, and that runs its code."""
    text = str(exc)
    refused = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", text, re.I)
    if refused:
        return f"it refers to {refused.group(1)}, which safe loading does not allow"
    if isinstance(exc, EOFError):
        return "the file is empty or truncated"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return f"the file is damaged or truncated ({text.split('.')[0].strip()})"
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        return "not a PyTorch file"
    if isinstance(exc, OSError):
        return f"cannot read it ({exc.strerror or type(exc).__name__}); the file is damaged or truncated"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    return f"{type(exc).__name__}: {lines[0]}" if lines else f"unreadable ({type(exc).__name__})"


def make_checkpoint(kind: str, model_state: Dict[str, Any], meta: Dict[str, Any], epoch: int,
                val_mae: Optional[float] = None, train_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model_state,
            "meta": dict(meta, kind=kind, epoch=epoch, val_mae=val_mae)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "atomic_torch_save", "atomic_write_text", "load_checkpoint",
           "load_error_reason", "make_checkpoint", "read_checkpoint"]
