"""Checkpoints: the file format, atomic writes, and loading a trained model back.

A checkpoint is a dict ``{"format": "dgl_crystalframer/checkpoint", "version", "model": state_dict,
"meta": {...}}`` (plus ``train_state`` in ``last.pt``), readable with ``torch.load(weights_only=True)``.
``meta`` carries what predicting needs: the ``ModelConfig`` (``model_config``), the target name and
unit, the ``normalizer`` (``targets.Normalizer``), the graph ``cutoff``, and the dataset and frame.
``load_checkpoint`` also reads the authors' PyTorch Lightning checkpoints (``official.py``).

Checkpoints are untrusted files: ``read_checkpoint`` unpickles with ``weights_only=True``, which
builds tensors and plain containers only, plus what Lightning may write into ``hyper_parameters``
(its AttributeDict, read as a dict by name and never imported; argparse.Namespace; numpy scalars).
Anything else is refused.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from . import official
from .config import ModelConfig
from .errors import CheckpointError, ConfigError
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


# The only classes a checkpoint may ask for beyond tensors and plain containers: Lightning's
# AttributeDict (a dict with attribute access; under its three module paths), built as a plain dict,
# and argparse.Namespace (harmless: it only stores attributes).  The official train.py saves a plain
# dict (save_hyperparameters of params.__dict__, stored as dict(hparams)), so these only cover
# other Lightning versions and scripts.
SAFE_GLOBALS = [(dict, name) for name in ("lightning_fabric.utilities.data.AttributeDict",
                                                    "lightning.fabric.utilities.data.AttributeDict",
                                                    "pytorch_lightning.utilities.parsing.AttributeDict")]
SAFE_GLOBALS.append(argparse.Namespace)
# numpy scalars (a logged metric in hyper_parameters, say): rebuilt from a dtype and raw bytes
_np_scalar = getattr(getattr(np, "_core", np.core), "multiarray").scalar
SAFE_GLOBALS += [(_np_scalar, "numpy.core.multiarray.scalar"), (_np_scalar, "numpy._core.multiarray.scalar"), np.dtype]
SAFE_GLOBALS += [type(np.dtype(code)) for code in ("f8", "f4", "i8", "i4", "b1")]  # the dtypes they carry


def read_checkpoint(path: str) -> Dict[str, Any]:
    """The dict in a checkpoint file, unpickled without running code (``weights_only=True``).

    Raises ``FileNotFoundError`` or ``CheckpointError`` with one line naming the file: a pickle
    that asks for anything else than tensors and plain containers is refused, never executed.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError from the zip reader, EOFError, ...
        # the weights-only unpickler names what it would not build
        # ("Unsupported global: GLOBAL x.y ...", "Trying to load unsupported GLOBAL x.y ...")
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        refused = isinstance(exc, pickle.UnpicklingError) and (
            found is not None or zipfile.is_zipfile(p) or _head(p)[:2] == b"\x80\x02")
        if not refused:
            raise CheckpointError(f"{path}: {_unreadable(p)}") from None
        what = f"it asks to load {found.group(1)}" if found else "it uses pickle operations beyond plain data"
        raise CheckpointError(f"{path}: refused, not a plain checkpoint: {what}, which could run code while "
                              "loading (only tensors and plain containers are read)") from None
    return _plain(obj)


def _head(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read(4)


def _unreadable(p: Path) -> str:
    head = _head(p)
    if head.startswith(b"PK") and not zipfile.is_zipfile(p):
        return "a truncated or damaged PyTorch file (its zip directory is missing)"
    if head.startswith(b"PK"):
        return "a zip archive that is not a PyTorch checkpoint"
    if head[:1] == b"\x80":
        return "a truncated or damaged pickle"
    return "not a PyTorch checkpoint file"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if "weights_only" not in line else type(exc).__name__  # torch's advice to unpickle unsafely: not ours


def _plain(obj: Any) -> Any:
    """A Namespace (the file's object or its ``hyper_parameters``) -> a plain dict; numpy scalars
    in ``hyper_parameters`` -> Python numbers."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict) and isinstance(obj.get("hyper_parameters"), argparse.Namespace):
        obj["hyper_parameters"] = vars(obj["hyper_parameters"])
    if isinstance(obj, dict) and isinstance(obj.get("hyper_parameters"), dict):
        obj["hyper_parameters"] = {k: v.item() if isinstance(v, np.generic) else v for k, v in obj["hyper_parameters"].items()}
    return obj


def describe(obj: Any) -> str:
    """What a loaded object that is not a checkpoint of ours looks like, for the error line."""
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a checkpoint dict"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return (f"a bare state_dict ({len(obj)} tensors) without the model's settings; load it into a model you "
                "build yourself, or convert the checkpoint it came from")
    if all(k in obj for k in official.LIGHTNING_KEYS):
        hp = obj.get("hyper_parameters") or {}
        name = hp.get("encoder_name") if isinstance(hp, dict) else None
        return f"a PyTorch Lightning checkpoint of another model (encoder_name={name!r}), not the official CrystalFramer"
    keys = ", ".join(map(str, list(obj)[:5]))
    return f"a dict without the '{CHECKPOINT_FORMAT}' or Lightning markers (keys: {keys}{', ...' if len(obj) > 5 else ''})"


def load_checkpoint(path: str, device: str | torch.device = "cpu", *, weights: Optional[str] = None,
                    overrides: Optional[Mapping[str, Any]] = None) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load a checkpoint -> (model in eval mode, meta): one this module writes (model.pt, best.pt,
    swa.pt, last.pt) or an official CrystalFramer PyTorch Lightning checkpoint (``.ckpt``).

    ``meta`` holds ``target``, ``unit``, ``normalizer`` ({"mean", "std"}: prediction in original
    units = model(bg) * std + mean), ``cutoff`` (the graph cutoff the model was trained with),
    ``model_config``, ``dataset``, ``frame``, ``kind`` and ``epoch`` (official checkpoints add
    ``official``: which weights, the overrides, the official settings).

    ``weights`` (official checkpoints): ``"swa"``, the weight average (default when present), or
    ``"model"``, the live weights.  ``overrides``: settings applied over the checkpoint's own, by the
    official names for official checkpoints (e.g. ``{"value_pe_angle_coef": 4.0}``), by ``ModelConfig``
    field names for ours (those that keep the weights' shapes, e.g. ``c_angl``, ``symmetrize_ties``).
    """
    ckpt = read_checkpoint(path)
    if official.is_official(ckpt):
        model, meta = official.convert(ckpt, label=str(path), weights=weights, overrides=overrides)
    elif isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT:
        if weights is not None:
            raise ConfigError(f"{path}: weights={weights!r} applies to official checkpoints; ours hold one set each")
        meta = dict(ckpt["meta"])
        config = dict(meta["model_config"])
        unknown = [k for k in (overrides or {}) if k not in ModelConfig.__dataclass_fields__]
        if unknown:
            raise ConfigError(f"override {unknown[0]!r} is not a ModelConfig field")
        config.update(overrides or {})
        model = build_model(config)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: its weights do not fit the model ({_first_line(exc)})") from None
        meta["model_config"] = model.config.as_dict()
    else:
        raise CheckpointError(f"{path}: {describe(ckpt)}")
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    return model, meta


def make_checkpoint(kind: str, model_state: Dict[str, Any], meta: Dict[str, Any], epoch: int,
                val_mae: Optional[float] = None, train_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model_state,
            "meta": dict(meta, kind=kind, epoch=epoch, val_mae=val_mae)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "CheckpointError", "SAFE_GLOBALS", "atomic_torch_save",
           "atomic_write_text", "describe", "load_checkpoint", "make_checkpoint", "read_checkpoint"]
