"""The training recipe of SPEC.md 5, resumable and DDP-ready.

    from dgl_crystalframer.training import TrainConfig, train_and_evaluate
    result = train_and_evaluate(TrainConfig(dataset="megnet_sample", target="e_form", preset="quick"))

Recipe: targets standardised with the train mean and population std, L1 loss, AdamW (lr 5e-4,
betas 0.9/0.98, weight decay 1e-5 on weight matrices only), grad-norm clip 1.0,
lr_t = lr0 * sqrt(T / (T + t)) with T = 4000 optimiser steps, stochastic weight averaging (equal
weights, every step) over the last ``swa_epochs`` epochs with the lr frozen, seed 123.

Files under ``out_dir`` (rank 0 only):

- ``last.pt``  everything needed to resume (model, SWA model, optimiser, step, RNG states, history);
  written atomically after every epoch, so an interrupted run (Ctrl-C, kill -9) resumed with
  ``resume=True`` ends with exactly the weights and metrics of an uninterrupted run.
- ``best.pt``  the model with the best validation MAE; ``swa.pt`` the reported (SWA) model.
  Every ``*.pt`` loads on its own with :func:`load_checkpoint` (model config, target name and unit,
  normalisation, graph cutoff are inside).
- ``log.csv`` one row per epoch; ``results.json``; ``test_predictions.csv``; ``parity.png`` and
  ``learning_curve.png``.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
nccl on CUDA), each rank trains on its own shard of every epoch's permutation (DistributedSampler,
seeded with seed + epoch), ``batch_size`` is the global batch, and only rank 0 writes or prints.
"""
from __future__ import annotations

import copy
import csv
import difflib
import io
import json
import math
import os
import random
import sys
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import sparse
from ._dgl import resolve_device
from .batch import collate_for, to_device
from .basis import default_cutoff
from .frames import FRAME_TYPES as FRAMES
from .model import PRESETS as _MODEL_PRESETS, build_model

MODEL_PRESETS = tuple(_MODEL_PRESETS)
TRAIN_PRESETS = ("smoke", "quick", "paper")
JARVIS_DATASETS = ("dft_3d_2021", "dft_3d")
CHECKPOINT_FORMAT = "dgl_crystalframer/checkpoint"
CHECKPOINT_VERSION = 1

DEFAULT_TARGETS = {"megnet_sample": "e_form", "megnet": "e_form", "dft_3d_2021": "formation_energy_peratom",
                   "dft_3d": "formation_energy_peratom"}

# Training presets.  ``paper`` follows SPEC.md 5 (epochs and batch size depend on the dataset,
# see paper_schedule); ``quick`` is what ``python -m benchmarks.jarvis`` runs by default: the
# paper's model on all 5,481 training crystals of the embedded MP sample, 10 epochs (about 9
# minutes on 2 CPU cores); ``smoke`` checks the plumbing in seconds with a tiny model.
PRESETS: Dict[str, Dict[str, Any]] = {
    "smoke": dict(epochs=2, batch_size=16, num_layers=1, dim=32, num_heads=4, ffn_dim=64,
                  num_angle_basis=8, max_train=48, max_eval=32),
    "quick": dict(epochs=10, batch_size=64, swa_epochs=2),
    "paper": dict(),
}

MODEL_FIELDS = ("frame", "num_layers", "dim", "num_heads", "ffn_dim", "num_angle_basis", "angle_basis_width",
                "c_dist", "c_angl", "dropout")
# Fields that may differ between an interrupted run and its resumption.
RUNTIME_FIELDS = ("device", "backend", "threads", "num_workers", "out_dir", "resume", "progress", "plots", "data_dir",
                  "cache_dir")


class ConfigError(ValueError):
    """A configuration that cannot run (unknown key, bad value, incompatible resume)."""


def paper_schedule(dataset: str, target: Optional[str], frame: Optional[str]) -> Dict[str, int]:
    """Epochs and batch size of the paper (SPEC.md 5) for this dataset/target/frame."""
    if dataset in JARVIS_DATASETS:
        if frame == "none":
            return dict(epochs=1600 if target == "mbj_bandgap" else 800, batch_size=256)
        return dict(epochs=2000, batch_size=256)
    return dict(epochs=500, batch_size=128)  # MP (megnet), the MP sample and user datasets


@dataclass
class TrainConfig:
    """Everything a training run needs; the field names are the keys of ``--config FILE``.

    ``None`` means "from the preset" (``preset`` = smoke | quick | paper) or, for the model fields,
    "from ``model_preset`` / the CrystalFramer defaults".  Explicit values always win.
    """

    # data
    dataset: str = "megnet_sample"
    target: Optional[str] = None  # None: the dataset's usual target (e_form, formation_energy_peratom)
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    split: str = "auto"
    cutoff: Optional[float] = None  # None: derived from the sigma bound (~6.93 A)
    max_train: Optional[int] = None  # cap on training crystals (a seeded random subset), for quick runs
    max_eval: Optional[int] = None  # cap on validation and test crystals each
    # model
    frame: Optional[str] = None  # none | max | weighted_pca | static_local | pca | lattice (default max)
    model_preset: Optional[str] = None  # crystalformer | default | lightweight
    num_layers: Optional[int] = None
    dim: Optional[int] = None
    num_heads: Optional[int] = None
    ffn_dim: Optional[int] = None
    num_angle_basis: Optional[int] = None
    angle_basis_width: Optional[float] = None
    c_dist: Optional[float] = None
    c_angl: Optional[float] = None
    dropout: Optional[float] = None
    # schedule
    preset: str = "paper"
    epochs: Optional[int] = None
    batch_size: Optional[int] = None  # global batch (split across DDP ranks)
    eval_batch_size: Optional[int] = None
    lr: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1e-5
    clip: float = 1.0
    lr_T: float = 4000.0
    swa_epochs: Optional[int] = None  # None: min(50, 10% of epochs)
    seed: int = 123
    # runtime
    device: str = "auto"
    backend: str = "auto"  # sparse operations: auto | dgl | torch (dgl_crystalframer.sparse)
    threads: Optional[int] = None
    num_workers: int = 0
    out_dir: Optional[str] = None  # None: runs/<dataset>-<target>-<frame>
    resume: bool = False
    progress: bool = True
    plots: bool = True

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys and values of the wrong type raise ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of TrainConfig keys, got {type(values).__name__}")
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(names)}")
        hints_t = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints_t[k], source) for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> "TrainConfig":
        """Read a YAML or JSON file of TrainConfig keys; ``overrides`` (non-None) win."""
        cfg = cls.from_dict(read_config_file(path), source=f"config file {path}")
        return cfg.with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """A copy with the non-None ``overrides`` applied (unknown keys raise ConfigError)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return replace(self)
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        merged.update(given)
        return type(self).from_dict(merged, source="overrides")

    # -- presets ----------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """A copy with every ``None`` filled from the preset, validated."""
        if self.preset not in TRAIN_PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}: use one of {', '.join(TRAIN_PRESETS)}")
        if self.model_preset is not None and self.model_preset not in MODEL_PRESETS:
            raise ConfigError(f"unknown model_preset {self.model_preset!r}: use one of {', '.join(MODEL_PRESETS)}")
        c = replace(self)
        if c.target is None:
            c.target = DEFAULT_TARGETS.get(c.dataset)
        if c.frame is None and c.model_preset is None:
            c.frame = "max"
        preset = dict(PRESETS[c.preset])
        if c.preset == "paper":
            frame = c.frame or _MODEL_PRESETS.get(c.model_preset, {}).get("frame", "max")
            preset.update(paper_schedule(c.dataset, c.target, frame))
        for k, v in preset.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.eval_batch_size is None:
            c.eval_batch_size = max(c.batch_size, 64)
        if c.swa_epochs is None:
            c.swa_epochs = max(1, min(50, int(round(0.1 * c.epochs)))) if c.epochs >= 2 else 0
        if c.out_dir is None:
            c.out_dir = default_out_dir(c.dataset, c.target, c.frame or c.model_preset)
        c.validate()
        return c

    def validate(self) -> None:
        if self.frame is not None and self.frame not in FRAMES:
            raise ConfigError(f"unknown frame {self.frame!r}: use one of {', '.join(FRAMES)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (got {v})")
        for name in ("max_train", "max_eval", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 or unset (got {v})")
        if self.epochs is not None and self.swa_epochs is not None and not 0 <= self.swa_epochs <= self.epochs:
            raise ConfigError(f"swa_epochs must be between 0 and epochs={self.epochs} (got {self.swa_epochs})")
        if not self.lr > 0 or not self.lr_T > 0 or not self.clip > 0 or self.weight_decay < 0:
            raise ConfigError("lr, lr_T and clip must be > 0 and weight_decay >= 0")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers (got {self.betas})")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (got {self.num_workers})")
        if self.backend not in ("auto",) + sparse.BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: use auto, dgl or torch")

    def model_kwargs(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in MODEL_FIELDS if getattr(self, k) is not None}


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping in a YAML/JSON config file, its keys checked against TrainConfig (ConfigError)."""
    import yaml  # JSON is YAML too

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: cannot parse it as YAML/JSON ({exc})") from exc
    values = {} if values is None else values
    TrainConfig.from_dict(values, source=f"config file {path}")  # raises on unknown keys / bad types
    return values


def default_out_dir(dataset: str, target: Optional[str], frame: Optional[str]) -> str:
    name = Path(dataset).stem if (os.sep in dataset or os.path.exists(dataset)) else dataset
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(s))  # noqa: E731
    return os.path.join("runs", f"{safe(name)}-{safe(target)}-{safe(frame)}")


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check/convert one config value against the field's type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be null")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    bad = ConfigError(f"{source}: {key} must be {getattr(base, '__name__', base)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise bad
        return tuple(float(x) for x in value)
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base is str:
        if not isinstance(value, (str, os.PathLike)):
            raise bad
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------
# small helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``obj`` to ``path`` so that a reader (or a resumed run) never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_splits(cfg: TrainConfig, progress: bool = True):
    """The train/val/test split of ``cfg`` (a resolved config), graphs built or read from the cache."""
    from .data import load_dataset

    return load_dataset(cfg.dataset, cfg.target, progress=progress, data_dir=cfg.data_dir, split=cfg.split,
                        cutoff=cfg.cutoff, cache_dir=cfg.cache_dir, seed=cfg.seed)


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups: decay on weight matrices (ndim >= 2), none on biases and vectors."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _Subset(Dataset):
    """A view of ``items`` of a dataset that keeps ``ids`` (and ``targets`` when known)."""

    def __init__(self, base: Dataset, items: List[int]):
        self.base, self.items = base, list(items)
        ids = getattr(base, "ids", None)
        self.ids = [ids[i] for i in self.items] if ids is not None else [str(i) for i in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.base[self.items[i]]


def _cap(ds: Dataset, cap: Optional[int], seed: int) -> Dataset:
    """A seeded random subset of ``cap`` items (in their original order), or ``ds`` itself."""
    if cap is None or len(ds) <= cap:
        return ds
    rng = np.random.default_rng(seed)
    return _Subset(ds, sorted(rng.choice(len(ds), size=cap, replace=False).tolist()))


def _ids(ds: Dataset) -> List[str]:
    ids = getattr(ds, "ids", None)
    return [str(x) for x in ids] if ids is not None else [str(i) for i in range(len(ds))]


def _targets(ds: Dataset) -> np.ndarray:
    """Targets [N] of a dataset (first target column), without building graphs when it can."""
    if isinstance(ds, _Subset):
        return _targets(ds.base)[ds.items]
    t = getattr(ds, "targets", None)
    if t is not None:
        arr = t.numpy() if isinstance(t, torch.Tensor) else np.asarray([np.asarray(x, dtype=np.float64).reshape(-1)[0] for x in t])
        arr = np.asarray(arr, dtype=np.float64)
        return arr.reshape(len(ds), -1)[:, 0] if arr.size else arr.reshape(0)
    return np.asarray([float(np.asarray(ds[i][1]).reshape(-1)[0]) for i in range(len(ds))], dtype=np.float64)


class SWA:
    """Equal-weight running average of a model's parameters (buffers copied from the model)."""

    def __init__(self, model: torch.nn.Module):
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.n_averaged = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for avg, cur in zip(self.module.parameters(), model.parameters()):
            if self.n_averaged == 0:
                avg.copy_(cur)
            else:
                avg.add_(cur.detach() - avg, alpha=1.0 / (self.n_averaged + 1))
        for avg, cur in zip(self.module.buffers(), model.buffers()):
            avg.copy_(cur)
        self.n_averaged += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.n_averaged = int(state["n_averaged"])


# ---------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Load any checkpoint this module writes (best.pt, swa.pt, last.pt) -> (model in eval mode, meta).

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
        raise ValueError(f"{path} is not a readable dgl_crystalframer checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a dgl_crystalframer checkpoint (no '{CHECKPOINT_FORMAT}' marker)")
    model = build_model(ckpt["meta"]["model_config"])
    model.load_state_dict(ckpt["model"])
    model.to(resolve_device(str(device)) if isinstance(device, str) else device)
    model.eval()
    return model, dict(ckpt["meta"])


def _checkpoint(kind: str, model_state: Dict[str, Any], meta: Dict[str, Any], epoch: int,
                val_mae: Optional[float] = None, train_state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": model_state,
            "meta": dict(meta, kind=kind, epoch=epoch, val_mae=val_mae)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    return ckpt


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group (and destroy it at the end)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device: torch.device) -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owned=True)


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """One training run; ``train_and_evaluate`` is ``Trainer(cfg).fit()``.

    After ``fit``: ``model`` (the trained model, unwrapped), ``swa`` (the SWA average or None),
    ``result`` (the dict also written to results.json).
    """

    def __init__(self, cfg: TrainConfig, data: Any = None):
        self.cfg = cfg.resolved()
        self._data = data
        self.dist = _Dist()
        self.model: Optional[torch.nn.Module] = None
        self.swa: Optional[SWA] = None
        self.result: Optional[Dict[str, Any]] = None
        # the state that a resume restores
        self.step = 0
        self.swa_start_step: Optional[int] = None
        self.epoch = 0  # completed epochs
        self.history: List[Dict[str, Any]] = []
        self.best_val = math.inf
        self.best_epoch = 0
        self.best_state: Optional[Dict[str, Any]] = None

    # -- setup --------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.dist.main and self.cfg.progress:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stderr)

    def _load_data(self):
        cfg = self.cfg
        if self.dist.world > 1:  # rank 0 first, so that a graph cache is built once
            if self.dist.main:
                splits = load_splits(cfg, cfg.progress)
            self.dist.barrier()
            if not self.dist.main:
                splits = load_splits(cfg, progress=False)
            return splits
        return load_splits(cfg, cfg.progress)

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        self.dist = _init_distributed(device)
        if self.dist.world > 1 and device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = device
        sparse.set_backend(cfg.backend)
        self.backend = sparse.select_backend(self.device)
        seed_everything(cfg.seed)

        splits = self._data if self._data is not None else self._load_data()
        info = dict(getattr(splits, "info", None) or {})
        self.info = info
        self.train_ds = _cap(splits.train, cfg.max_train, cfg.seed)
        self.val_ds = _cap(splits.val, cfg.max_eval, cfg.seed + 1)
        self.test_ds = _cap(splits.test, cfg.max_eval, cfg.seed + 2)
        if len(self.train_ds) == 0 or len(self.val_ds) == 0 or len(self.test_ds) == 0:
            raise ValueError(f"empty split: train {len(self.train_ds)}, val {len(self.val_ds)}, test {len(self.test_ds)}")
        y = _targets(self.train_ds)
        self.mean, self.std = float(y.mean()), float(y.std())  # population std (ddof=0)
        if not math.isfinite(self.std) or self.std <= 0:
            self.std = 1.0
        target = info.get("target", cfg.target)
        self.target = target if isinstance(target, str) else cfg.target
        self.unit = str(info.get("unit") or "")
        self.cutoff = float(info.get("cutoff") or cfg.cutoff or default_cutoff())

        # DataLoader workers batch on CPU; the torch backend gets plain tensors (pinned for a GPU)
        self.collate = collate_for(self.device, self.backend)
        self.pin_memory = self.device.type == "cuda"
        model = build_model(cfg.model_kwargs(), cfg.model_preset)
        self.cfg.frame = model.config.get("frame", cfg.frame)
        model.to(self.device)
        self.model = model
        self.n_params = model.num_parameters()
        if self.dist.rank:  # different dropout masks per rank; weights come from rank 0 anyway
            torch.manual_seed(cfg.seed + 1000 * self.dist.rank)
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = model
        self.optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr,
                                           betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.per_rank_batch = max(1, cfg.batch_size // self.dist.world)
        self.sampler = DistributedSampler(self.train_ds, num_replicas=self.dist.world, rank=self.dist.rank,
                                          shuffle=True, seed=cfg.seed, drop_last=False)
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.per_rank_batch)
        self.swa_start_epoch = cfg.epochs - cfg.swa_epochs
        self.out = Path(cfg.out_dir)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "model_config": dict(model.config), "target": self.target, "unit": self.unit,
            "normalizer": {"mean": self.mean, "std": self.std}, "cutoff": self.cutoff,
            "dataset": cfg.dataset, "frame": self.cfg.frame, "params": self.n_params,
            "train_config": _plain(asdict(self.cfg)),
        }

    # -- resume -------------------------------------------------------------------------------
    def _try_resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            self._log(f"resume: no checkpoint at {path}; starting from scratch")
            return
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        old = ckpt.get("train_state", {}).get("config", {})
        now = _plain(asdict(self.cfg))
        diff = [k for k in now if k not in RUNTIME_FIELDS and k in old and old[k] != now[k]]
        if diff:
            raise ConfigError(f"cannot resume from {path}: the configuration differs in "
                              + ", ".join(f"{k} ({old[k]!r} there, {now[k]!r} now)" for k in diff)
                              + "; use the same settings or another --out")
        st = ckpt["train_state"]
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.swa_start_step, self.epoch = int(st["step"]), st["swa_start_step"], int(st["epoch"])
        self.history = list(st["history"])
        self.best_val, self.best_epoch = float(st["best_val"]), int(st["best_epoch"])
        self.best_state = st.get("best_model")
        if st.get("swa") is not None:
            self.swa = SWA(self.model)
            self.swa.load_state_dict(st["swa"])
        rng = st["rng"]
        _set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
        self._log(f"resumed from {path}: {self.epoch}/{self.cfg.epochs} epochs done")

    def _save_last(self) -> None:
        states = [_rng_state()]
        if self.dist.world > 1:
            gathered: List[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if not self.dist.main:
            return
        train_state = {
            "config": _plain(asdict(self.cfg)), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "swa_start_step": self.swa_start_step, "epoch": self.epoch, "history": self.history,
            "best_val": self.best_val, "best_epoch": self.best_epoch, "best_model": self.best_state,
            "swa": self.swa.state_dict() if self.swa is not None else None, "rng": states,
        }
        atomic_torch_save(_checkpoint("last", self.model.state_dict(), self.meta, epoch=self.epoch,
                                      train_state=train_state), self.out / "last.pt")

    # -- loops --------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        t = step if self.swa_start_step is None else min(step, self.swa_start_step)
        return self.cfg.lr * math.sqrt(self.cfg.lr_T / (self.cfg.lr_T + t))

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg = self.cfg
        if epoch >= self.swa_start_epoch and self.swa_start_step is None:
            self.swa_start_step = self.step  # lr frozen from here on
        in_swa = epoch >= self.swa_start_epoch
        self.sampler.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed(cfg.seed + epoch)
        loader = DataLoader(self.train_ds, batch_size=self.per_rank_batch, sampler=self.sampler,
                            collate_fn=self.collate, num_workers=cfg.num_workers, generator=gen,
                            pin_memory=self.pin_memory)
        self.ddp.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (cfg.progress and self.dist.main and sys.stderr.isatty()), mininterval=1.0,
                   file=sys.stderr)
        loss_sum = torch.zeros((), dtype=torch.float64)
        n_seen = 0
        t0 = time.perf_counter()
        for bg, y in loader:
            bg = to_device(bg, self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True).reshape(len(y), -1)[:, 0].float()
            yn = (y - self.mean) / self.std
            pred = self.ddp(bg).reshape(-1)
            loss = F.l1_loss(pred, yn)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
            loss_v, gnorm_v = torch.stack([loss.detach(), gnorm.to(loss.dtype)]).tolist()  # one device sync a step
            if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
                raise FloatingPointError(
                    f"non-finite training loss ({loss_v}) or gradient norm ({gnorm_v}) at epoch {epoch + 1}, "
                    f"step {self.step + 1} (lr {self.lr_at(self.step):.3g}); try a smaller lr or check the targets")
            lr = self.lr_at(self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.step += 1
            if in_swa:
                if self.swa is None:
                    self.swa = SWA(self.model)
                self.swa.update(self.model)
            loss_sum += loss_v * len(y)
            n_seen += len(y)
            bar.update(1)
            if bar.n % 5 == 0 or bar.n == self.steps_per_epoch:
                bar.set_postfix(loss=f"{float(loss_sum) / n_seen:.4f}",
                                cryst_s=f"{n_seen * self.dist.world / (time.perf_counter() - t0):.0f}")
        seconds = time.perf_counter() - t0
        bar.close()
        stats = torch.tensor([float(loss_sum), float(n_seen)], dtype=torch.float64)
        if self.dist.world > 1:
            dist.all_reduce(stats)
        train_loss = float(stats[0] / stats[1])
        return {"train_loss": train_loss, "train_mae": train_loss * self.std, "lr": self.lr_at(self.step - 1),
                "train_seconds": seconds, "crystals_per_second": float(stats[1]) / seconds, "swa": in_swa,
                "n_samples": int(stats[1])}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, ds: Dataset) -> Tuple[np.ndarray, np.ndarray]:
        """Predictions and targets (original units) for ``ds``; sharded across DDP ranks."""
        was_training = model.training
        model.eval()
        items = list(range(self.dist.rank, len(ds), self.dist.world))
        loader = DataLoader(_Subset(ds, items), batch_size=self.cfg.eval_batch_size, shuffle=False,
                            collate_fn=self.collate, num_workers=self.cfg.num_workers, pin_memory=self.pin_memory)
        preds, targets = [], []
        for bg, y in loader:
            preds.append(model(to_device(bg, self.device, non_blocking=True)).reshape(-1).double())
            targets.append(y.reshape(len(y), -1)[:, 0].double())
        model.train(was_training)
        p = (torch.cat(preds).cpu() * self.std + self.mean).numpy() if preds else np.zeros(0)
        t = torch.cat(targets).numpy() if targets else np.zeros(0)
        if self.dist.world > 1:
            gathered: List[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, (items, p, t))
            pf, tf = np.zeros(len(ds)), np.zeros(len(ds))
            for idx, pp, tt in gathered:
                pf[idx], tf[idx] = pp, tt
            return pf, tf
        return p, t

    def evaluate(self, model: torch.nn.Module, ds: Dataset) -> float:
        p, t = self.predict(model, ds)
        return float(np.mean(np.abs(p - t)))

    # -- main ---------------------------------------------------------------------------------
    def fit(self, epoch_callback: Optional[Callable[[int, Dict[str, Any]], Any]] = None) -> Dict[str, Any]:
        try:
            return self._fit(epoch_callback)
        finally:
            if self.dist.owned and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self, epoch_callback) -> Dict[str, Any]:
        self._setup()
        cfg = self.cfg
        if cfg.resume:
            self._try_resume()
        self._log(f"{cfg.dataset}/{self.target}: {len(self.train_ds)} train, {len(self.val_ds)} val, "
                  f"{len(self.test_ds)} test crystals; frame {cfg.frame}, {self.n_params:,} parameters, "
                  f"{cfg.epochs} epochs ({cfg.swa_epochs} SWA) of {self.steps_per_epoch} steps, device {self.device} "
                  f"(backend {self.backend})"
                  + (f", {self.dist.world} ranks" if self.dist.world > 1 else ""))
        while self.epoch < cfg.epochs:
            epoch = self.epoch
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            val_mae = self.evaluate(self.model, self.val_ds)
            self.epoch = epoch + 1
            improved = val_mae < self.best_val
            if improved:
                self.best_val, self.best_epoch = val_mae, self.epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                if self.dist.main:
                    atomic_torch_save(_checkpoint("best", self.best_state, self.meta, epoch=self.epoch, val_mae=val_mae),
                                      self.out / "best.pt")
            metrics.update(epoch=self.epoch, val_mae=val_mae, best_val_mae=self.best_val,
                           seconds=time.perf_counter() - t0)
            self.history.append(metrics)
            self._save_last()
            if self.dist.main:
                self._write_log()
            self._log(f"epoch {self.epoch}/{cfg.epochs}  loss {metrics['train_loss']:.4f}  "
                      f"train MAE {metrics['train_mae']:.4g}  val MAE {val_mae:.4g} {self.unit}  "
                      f"lr {metrics['lr']:.2e}  {metrics['crystals_per_second']:.0f} cryst/s  "
                      f"{metrics['seconds']:.1f} s" + ("  SWA" if metrics["swa"] else "") + ("  *best" if improved else ""))
            if epoch_callback is not None:
                epoch_callback(self.epoch, dict(metrics))
        return self._finish()

    def _write_log(self) -> None:
        keys = ["epoch", "train_loss", "train_mae", "val_mae", "best_val_mae", "lr", "swa", "train_seconds",
                "seconds", "crystals_per_second"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for row in self.history:
            w.writerow(row)
        _atomic_write_text(self.out / "log.csv", buf.getvalue())

    def _finish(self) -> Dict[str, Any]:
        cfg = self.cfg
        final = self.swa.module if self.swa is not None and self.swa.n_averaged > 0 else self.model
        kind = "swa" if final is not self.model else "final"
        val_mae = self.evaluate(final, self.val_ds)
        t0 = time.perf_counter()
        test_pred, test_true = self.predict(final, self.test_ds)
        latency = (time.perf_counter() - t0) / max(1, len(self.test_ds))
        test_mae = float(np.mean(np.abs(test_pred - test_true)))
        best_test = None
        if self.best_state is not None:
            best_model = build_model(self.meta["model_config"]).to(self.device)
            best_model.load_state_dict(self.best_state)
            best_test = self.evaluate(best_model, self.test_ds)
        train_ids = set(_ids(self.train_ds))
        y_train_mean = self.mean
        seconds = sum(h["seconds"] for h in self.history)
        train_seconds = sum(h["train_seconds"] for h in self.history)
        samples = sum(h["n_samples"] for h in self.history)
        result = {
            "dataset": cfg.dataset, "target": self.target, "unit": self.unit, "frame": cfg.frame,
            "preset": cfg.preset, "model_preset": cfg.model_preset, "sample_size_run": cfg.dataset == "megnet_sample",
            "n_train": len(self.train_ds), "n_val": len(self.val_ds), "n_test": len(self.test_ds),
            "test_mae": test_mae, "val_mae": val_mae, "reported_model": kind,
            "best_val_mae": self.best_val, "best_epoch": self.best_epoch, "best_test_mae": best_test,
            "test_mae_of_train_mean": float(np.mean(np.abs(test_true - y_train_mean))),
            "params": self.n_params, "epochs": cfg.epochs, "swa_epochs": cfg.swa_epochs, "steps": self.step,
            "batch_size": cfg.batch_size, "train_seconds": seconds, "seconds_per_epoch": seconds / max(1, len(self.history)),
            "crystals_per_second": samples / train_seconds if train_seconds > 0 else None,
            "latency_ms_per_crystal": 1000.0 * latency,
            "device": str(self.device), "backend": self.backend, "threads": torch.get_num_threads(), "world_size": self.dist.world,
            "seed": cfg.seed, "normalizer": {"mean": self.mean, "std": self.std}, "cutoff": self.cutoff,
            "out_dir": str(self.out), "checkpoint": str(self.out / "swa.pt"),
            "train_test_overlap": len(train_ids & set(_ids(self.test_ds))),
            "config": _plain(asdict(cfg)),
        }
        if self.dist.main:
            atomic_torch_save(_checkpoint(kind, final.state_dict(), self.meta, epoch=self.epoch, val_mae=val_mae),
                              self.out / "swa.pt")
            with open(self.out / "test_predictions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", f"{self.target}", "prediction"])
                for i, t, p in zip(_ids(self.test_ds), test_true, test_pred):
                    w.writerow([i, f"{t:.6g}", f"{p:.6g}"])
            if cfg.plots:
                try:
                    write_plots(self.out, self.history, test_true, test_pred, self.target, self.unit,
                                title=f"{cfg.dataset} {self.target}, frame {cfg.frame}")
                except Exception as exc:  # plots are a convenience; never lose a run over them
                    self._log(f"warning: plots not written ({exc})")
            _atomic_write_text(self.out / "results.json", json.dumps(result, indent=2) + "\n")
            self._log(f"test MAE {test_mae:.4g} {self.unit} ({kind} model; best-val model {best_test if best_test is None else f'{best_test:.4g}'}); "
                      f"results in {self.out / 'results.json'}")
        self.result = result
        return result


def _plain(obj: Any) -> Any:
    """Tuples -> lists etc., so that configs compare equal after a checkpoint round trip."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_plots(out_dir: Path, history: List[Dict[str, Any]], y_true: np.ndarray, y_pred: np.ndarray,
                target: str, unit: str, title: str = "") -> None:
    """``parity.png`` (test set) and ``learning_curve.png`` (train/val MAE per epoch) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    label = f"{target} ({unit})" if unit else str(target)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(y_true, y_pred, s=6, alpha=0.6)
    if len(y_true):
        lo, hi = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    mae = float(np.mean(np.abs(y_true - y_pred))) if len(y_true) else float("nan")
    ax.set_xlabel(f"DFT {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_title(f"{title}\ntest MAE {mae:.4g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "parity.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_mae"] for h in history], label="train MAE")
    ax.plot(ep, [h["val_mae"] for h in history], label="val MAE")
    swa = [h["epoch"] for h in history if h.get("swa")]
    if swa:
        ax.axvspan(min(swa) - 1, max(swa), color="grey", alpha=0.15, label="SWA")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"MAE ({unit})" if unit else "MAE")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "learning_curve.png", dpi=120)
    plt.close(fig)


def train_and_evaluate(cfg: TrainConfig, epoch_callback: Optional[Callable[[int, Dict[str, Any]], Any]] = None,
                       data: Any = None) -> Dict[str, Any]:
    """Train with the SPEC.md 5 recipe, evaluate the SWA model on the test split, return the results.

    ``epoch_callback(epoch, metrics)`` runs after every epoch (after its checkpoint is written) with
    ``metrics`` holding at least ``val_mae``, ``train_loss``, ``train_mae``, ``lr``, ``seconds``;
    whatever it raises propagates (hpo uses that to prune).  ``data`` may be a preloaded
    ``DatasetSplits`` (the same split for several runs).  A non-finite loss raises FloatingPointError.
    """
    return Trainer(cfg, data=data).fit(epoch_callback)


__all__ = ["TrainConfig", "Trainer", "train_and_evaluate", "load_checkpoint", "ConfigError", "PRESETS",
           "paper_schedule", "FRAMES", "read_config_file", "seed_everything", "write_plots", "SWA"]
