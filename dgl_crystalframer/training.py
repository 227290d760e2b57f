"""The training recipe of docs/METHOD.md 5, resumable and DDP-ready.

    from dgl_crystalframer import TrainConfig, train_and_evaluate
    result = train_and_evaluate(TrainConfig(dataset="megnet_sample", target="e_form", preset="quick"))

Recipe: targets standardised with the train mean and population std, L1 loss, AdamW (betas
0.9/0.98, weight decay 1e-5 on weight matrices only), grad-norm clip 1.0, a learning-rate schedule
(``schedule.py``: the paper's lr0 * sqrt(T / (T + t)), frozen while the weights are averaged, or a
cosine annealed to zero), stochastic weight averaging (equal weights, every step) over the last
``swa_epochs`` epochs or, with a time budget, the last ``swa_fraction`` of the planned steps.
The length of the run is ``epochs``, or a ``time_budget`` that plans the steps that fit.
With ``init_from`` the run starts from a checkpoint's weights (``finetune.py``).

Files under ``out_dir`` (rank 0 only):

- ``last.pt``  everything needed to resume (model, SWA model, optimiser, step, RNG states, history);
  written atomically after every epoch, so an interrupted run (Ctrl-C, kill -9) resumed with
  ``resume=True`` ends with exactly the weights and metrics of an uninterrupted run.
- ``model.pt`` the reported model (``reported_model``; unset: the weight average for the paper
  schedule, the final model for validation sets under ``config.SMALL_VALIDATION`` crystals, else the
  best-validation model); ``best.pt`` the best-validation model; ``swa.pt``
  the weight average (SWA) of the last steps.
  Every ``*.pt`` loads on its own with :func:`checkpoint.load_checkpoint`.
- ``log.csv`` one row per epoch; ``results.json``; ``split_ids.json`` (the ids of each split);
  ``test_predictions.csv``; ``parity.png`` and ``learning_curve.png``.

Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
nccl on CUDA), each rank trains on its own shard of every epoch's permutation (DistributedSampler,
seeded with seed + epoch), ``batch_size`` is the global batch, and only rank 0 writes or prints.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import finetune, sparse
from .basis import default_cutoff
from .batch import collate_for, to_device
from .checkpoint import atomic_torch_save, atomic_write_text, make_checkpoint, read_checkpoint
from .config import RUNTIME_FIELDS, TrainConfig, default_reported_model
from .domain import domain_of
from .graph_store import GraphList
from .errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from .distributed import DistInfo, init_distributed, rng_state, seed_everything, set_rng_state
from .model import build_model
from .plots import write_plots
from .schedule import Plan, Probe, Schedule, format_duration, parse_duration, plan_steps
from .datasets import dataset_spec
from .targets import Normalizer


# training losses are read back (and checked) every this many steps: on CPU at once, before the
# optimiser step; on a GPU in groups, so that the host runs ahead of the device
READ_EVERY = {"cpu": 1, "cuda": 16}


def default_num_workers(device: torch.device) -> int:
    """DataLoader workers when the user sets none: on a GPU, batching (``dgl.batch``, ~16 ms at batch
    256) would otherwise stall the device every step; on CPU the workers would take the cores the
    model uses."""
    return min(4, max(0, (os.cpu_count() or 1) - 1)) if torch.device(device).type == "cuda" else 0


def make_loader(ds: Dataset, batch_size: int, collate: Callable, num_workers: int, pin_memory: bool,
                **kwargs) -> DataLoader:
    """The trainer's DataLoader: batches made in ``num_workers`` processes, kept alive across epochs
    and a few batches ahead of the model (persistent workers, prefetch), pinned for a GPU."""
    workers = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, pin_memory=pin_memory,
                      **workers, **kwargs)


def use_deterministic(device: torch.device, backend: str) -> None:
    """Bitwise repeatable training steps on a GPU: torch's deterministic algorithms (``index_add_``
    becomes a sorted, fixed-order sum instead of float atomics; cuBLAS a fixed workspace).  DGL's
    CUDA kernels have no such mode, so the GPU needs the torch backend.  On CPU every step is
    repeatable already (the kernels sum in a fixed order); the switch costs nothing there."""
    if device.type == "cuda" and backend == "dgl":
        raise ConfigError("--deterministic on a GPU needs --backend torch (DGL's CUDA kernels sum with atomics)")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before the first step
    torch.use_deterministic_algorithms(True)


def load_splits(cfg: TrainConfig, progress: bool = True):
    """The train/val/test split of ``cfg`` (a resolved config), graphs built or read from the cache."""
    from .data import load_dataset

    return load_dataset(cfg.dataset, cfg.target, progress=progress, data_dir=cfg.data_dir, split=cfg.split,
                        cutoff=cfg.cutoff, cache_dir=cfg.cache_dir, seed=cfg.split_seed, build_workers=cfg.build_workers)


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


def _graph_items(ds: Dataset):
    """Each crystal's graph as its dataset holds it: a stored one's reference is not read."""
    base, items = (ds.base, ds.items) if isinstance(ds, _Subset) else (ds, range(len(ds)))
    graphs = getattr(base, "graphs", None)
    if isinstance(graphs, GraphList):
        return (graphs.item(i) for i in items)
    return (base[i][0] for i in items)


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
        averaged, current = list(self.module.parameters()), [p.detach() for p in model.parameters()]
        if self.n_averaged == 0:
            torch._foreach_copy_(averaged, current)
        else:  # avg += (cur - avg) / (n + 1), all parameters in one call
            torch._foreach_lerp_(averaged, current, 1.0 / (self.n_averaged + 1))
        for avg, cur in zip(self.module.buffers(), model.buffers()):
            avg.copy_(cur)
        self.n_averaged += 1

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "n_averaged": self.n_averaged}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.n_averaged = int(state["n_averaged"])


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """One training run; ``train_and_evaluate`` is ``Trainer(cfg).fit()``.

    After ``fit``: ``model`` (the trained model, unwrapped), ``swa`` (the SWA average or None),
    ``plan`` (the steps it ran), ``result`` (the dict also written to results.json).
    """

    def __init__(self, cfg: TrainConfig, data: Any = None, started_at: Optional[float] = None):
        self.initial: Optional[Tuple[Dict[str, Any], Dict[str, Any]]] = None  # fine-tuning: (weights, meta)
        if cfg.init_from:
            self.initial = finetune.load_initial(cfg.init_from)
            cfg = finetune.with_checkpoint_architecture(cfg, self.initial[1])
        self.cfg = cfg.resolved()
        self._data = data
        self.started_at = started_at  # perf_counter() when the run began (data loading counts in a budget)
        self.dist = DistInfo()
        self.model: Optional[torch.nn.Module] = None
        self.swa: Optional[SWA] = None
        self.result: Optional[Dict[str, Any]] = None
        self.schedule = Schedule(self.cfg.schedule, self.cfg.lr, self.cfg.lr_T, self.cfg.warmup_steps)
        self.budget = parse_duration(self.cfg.time_budget) if self.cfg.time_budget is not None else None
        self.timers: Dict[str, float] = {"data": 0.0, "train": 0.0, "validation": 0.0, "checkpoints": 0.0}
        self.elapsed_before = 0.0  # a resumed run: the seconds the interrupted process had spent
        # the state that a resume restores
        self.plan: Optional[Plan] = None
        self._probe = Probe()  # a budgeted run's speed, until it has a plan
        self._deterministic_before = torch.are_deterministic_algorithms_enabled()  # restored after fit
        self.step = 0
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
        if self.dist.world == 1:
            return load_splits(cfg, cfg.progress)
        # rank 0 first, so that a graph cache is built once; its failure stops every rank
        failure: List[Any] = [None]
        if self.dist.main:
            try:
                splits = load_splits(cfg, cfg.progress)
            except Exception as exc:
                failure = [f"{type(exc).__name__}: {exc}"]
                dist.broadcast_object_list(failure, src=0)
                raise
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise DataError(f"rank 0 could not load the data ({failure[0]})")
        return splits if self.dist.main else load_splits(cfg, progress=False)

    def _setup(self) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = sparse.resolve_device(cfg.device)
        self.dist = init_distributed(device)
        if self.dist.world > 1 and device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        else:
            self.device = device
        self.backend = sparse.select_backend(self.device, sparse.backend_from_env(cfg.backend))  # once, passed down
        if cfg.deterministic:
            use_deterministic(self.device, self.backend)
        seed_everything(cfg.seed)

        t0 = time.perf_counter()
        splits = self._data if self._data is not None else self._load_data()
        # data loaded by the caller counts from ``started_at`` (the command line loads it once for all runs)
        self.timers["data"] = time.perf_counter() - (t0 if self._data is None else self.started_at)
        info = dict(getattr(splits, "info", None) or {})
        self.info = info
        # the caps are part of the split: the same subsets for every training seed
        self.train_ds = _cap(splits.train, cfg.max_train, cfg.split_seed)
        self.val_ds = _cap(splits.val, cfg.max_eval, cfg.split_seed + 1)
        self.test_ds = _cap(splits.test, cfg.max_eval, cfg.split_seed + 2)
        if len(self.train_ds) == 0 or len(self.val_ds) == 0 or len(self.test_ds) == 0:
            raise DataError(f"{cfg.dataset}: empty split ({info.get('split', 'given splits')}: train {len(self.train_ds)}, "
                            f"val {len(self.val_ds)}, test {len(self.test_ds)}): training needs entries in all three; "
                            "add some, or drop the split column for a random 80/10/10 split")
        self.normalizer = Normalizer.fit(_targets(self.train_ds))
        target = info.get("target", cfg.target)
        self.target = target if isinstance(target, str) else cfg.target
        self.unit = str(info.get("unit") or cfg.unit or "")
        self.cutoff = float(info.get("cutoff") or cfg.cutoff or default_cutoff())

        model = build_model(cfg.model_config())
        model.sparse_backend = self.backend
        # DataLoader workers batch on CPU; the torch backend gets plain tensors (pinned for a GPU),
        # only those the model reads
        self.collate = collate_for(self.device, self.backend, model.input_keys())
        self.pin_memory = self.device.type == "cuda"
        self.num_workers = default_num_workers(self.device) if cfg.num_workers is None else cfg.num_workers
        self._train_loader: Optional[DataLoader] = None
        self._eval_loaders: Dict[int, Tuple[Dataset, DataLoader]] = {}
        self.init_from = None
        if self.initial is not None:  # fine-tuning: the checkpoint's weights, some of them frozen
            weights, init_meta = self.initial
            finetune.check_cutoff(init_meta, self.cutoff, cfg.init_from)
            model.load_state_dict(weights)
            frozen = finetune.freeze(model, cfg.freeze_blocks)
            n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            self.init_from = finetune.provenance(cfg.init_from, init_meta, frozen, n_frozen)
        self.frame = model.config.frame
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
        if self.budget is None:  # the plan follows from the epoch count; with a budget, from the first steps
            total = cfg.epochs * self.steps_per_epoch
            self.plan = Plan(total, total - cfg.swa_epochs * self.steps_per_epoch)
        self.out = Path(cfg.out_dir)
        if not cfg.resume and not cfg.overwrite:
            _refuse_unfinished_run(self.out)
        elif cfg.overwrite and not cfg.resume and self.dist.main:  # nothing of the old run may pass for this one's
            for name in ("last.pt", "best.pt", "swa.pt", "model.pt", "results.json"):
                (self.out / name).unlink(missing_ok=True)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.meta = {
            "model_config": model.config.as_dict(), "target": self.target, "unit": self.unit,
            "normalizer": self.normalizer.as_dict(), "cutoff": self.cutoff,
            "dataset": cfg.dataset, "frame": self.frame, "params": self.n_params,
            "train_config": _plain(asdict(self.cfg)), "init_from": self.init_from,
            # what predict checks new crystals against (domain.py)
            "domain": domain_of(_graph_items(self.train_ds)),
        }

    # -- resume -------------------------------------------------------------------------------
    def _try_resume(self) -> None:
        path = self.out / "last.pt"
        if not path.is_file():
            self._log(f"resume: no checkpoint at {path}; starting from scratch")
            return
        try:
            ckpt = read_checkpoint(path)
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("train_state"), dict):
                raise CheckpointError(f"{path}: not a resume checkpoint (no training state)")
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume: {exc}; to train from scratch, delete {path} or rerun with "
                                  "--overwrite instead of --resume") from exc
        old = ckpt["train_state"].get("config", {})
        now = _plain(asdict(self.cfg))
        missing = [k for k in now if k not in RUNTIME_FIELDS and k not in old]
        if missing:
            raise ConfigError(f"cannot resume from {path}: it was written by another version of dgl_crystalframer "
                              f"(no setting for {', '.join(missing)}); start a new run with another --out")
        diff = [k for k in now if k not in RUNTIME_FIELDS and old[k] != now[k]]
        if diff:
            raise ConfigError(f"cannot resume from {path}: the configuration differs in "
                              + ", ".join(f"{k} ({old[k]!r} there, {now[k]!r} now)" for k in diff)
                              + "; use the same settings or another --out")
        st = ckpt["train_state"]
        self.model.load_state_dict(ckpt["model"])
        if ckpt["meta"].get("init_from"):  # a fine-tuning run keeps the record of the weights it started from
            self.init_from = self.meta["init_from"] = ckpt["meta"]["init_from"]
        self.optimizer.load_state_dict(st["optimizer"])
        self.step, self.epoch = int(st["step"]), int(st["epoch"])
        if st.get("plan") is not None:  # the resumed run keeps the schedule it planned, budget or not
            self.plan = Plan(**st["plan"])
        self.history = list(st["history"])
        self.best_val, self.best_epoch = float(st["best_val"]), int(st["best_epoch"])
        self.best_state = st.get("best_model")
        if st.get("swa") is not None:
            self.swa = SWA(self.model)
            self.swa.load_state_dict(st["swa"])
        for key, seconds in (st.get("timers") or {}).items():  # this process's data loading adds to them
            self.timers[key] = self.timers.get(key, 0.0) + seconds
        self.elapsed_before = float(st.get("elapsed", 0.0))
        rng = st["rng"]
        set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])
        self._log(f"resumed from {path}: {self.epoch} epochs, {self.step} steps done")

    def _save_last(self) -> None:
        states = [rng_state()]
        if self.dist.world > 1:
            gathered: List[Any] = [None] * self.dist.world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if not self.dist.main:
            return
        train_state = {
            "config": _plain(asdict(self.cfg)), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "epoch": self.epoch, "plan": self.plan.as_dict() if self.plan is not None else None,
            "history": self.history, "best_val": self.best_val, "best_epoch": self.best_epoch,
            "best_model": self.best_state, "swa": self.swa.state_dict() if self.swa is not None else None,
            "rng": states, "timers": dict(self.timers), "elapsed": self._elapsed(),
        }
        atomic_torch_save(make_checkpoint("last", self.model.state_dict(), self.meta, epoch=self.epoch,
                                          train_state=train_state), self.out / "last.pt")

    # -- the plan ------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.schedule.lr_at(step, self.plan)

    @property
    def planned_epochs(self) -> Optional[int]:
        return None if self.plan is None else math.ceil(self.plan.total_steps / self.steps_per_epoch)

    def _elapsed(self) -> float:
        """Seconds since the run started (the part before an interruption included)."""
        return self.elapsed_before + time.perf_counter() - self.started_at

    @torch.no_grad()
    def _seconds_per_eval_crystal(self) -> float:
        """Forward time per crystal at the evaluation batch size, measured on validation crystals."""
        batch = [self.val_ds[i] for i in range(min(len(self.val_ds), self.cfg.eval_batch_size))]
        bg, _ = self.collate(batch)
        was = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        self.model(to_device(bg, self.device, backend=self.backend))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.model.train(was)
        return (time.perf_counter() - t0) / len(batch)

    def _make_plan(self, seconds_per_step: float) -> None:
        """With a time budget: the most steps that fit, from the speed measured so far."""
        cfg = self.cfg
        per_crystal = self._seconds_per_eval_crystal()
        per_eval = per_crystal * len(self.val_ds) + 0.05  # + the checkpoint written after each epoch
        # the end: final and SWA models on val, all three on test, files and plots (seconds, loosely)
        final = per_crystal * (2 * len(self.val_ds) + 3 * len(self.test_ds)) + (3.0 if cfg.plots else 0.5)
        plan = plan_steps(self.budget, self._elapsed(), self.step, seconds_per_step, self.steps_per_epoch, per_eval,
                          final, cfg.swa_fraction)
        if self.dist.world > 1:  # every rank must run the same number of steps: rank 0's plan
            shared = [plan]
            dist.broadcast_object_list(shared, src=0)
            plan = shared[0]
        self.plan = plan
        self._log(f"time budget {format_duration(self.budget)}: {plan.total_steps} steps ({self.planned_epochs} epochs, "
                  f"SWA over the last {plan.total_steps - plan.swa_start_step}) at {seconds_per_step:.3g} s/step, "
                  f"{per_eval:.1f} s per validation; {format_duration(self._elapsed())} spent")

    def _check_budget(self, recent_per_step: Optional[float] = None) -> None:
        """After an epoch: if the run is falling behind its budget (a slower machine than measured,
        another job) or well ahead of it (the machine got faster), plan again with the speed of the
        last epoch (rank 0 decides for every rank)."""
        if self.budget is None or self.plan is None or self.step >= self.plan.total_steps:
            return
        plan = None
        if self.dist.main:
            old = self.plan
            per_step = recent_per_step or self.timers["train"] / max(1, self.step)
            per_eval = (self.timers["validation"] + self.timers["checkpoints"]) / max(1, self.epoch)
            epochs_left = math.ceil(old.total_steps / self.steps_per_epoch) - self.epoch
            projected = (self._elapsed() + (old.total_steps - self.step) * per_step + epochs_left * per_eval
                         + (old.seconds_final or 0.0))
            behind = projected > 1.03 * self.budget
            ahead = projected < 0.93 * self.budget  # the plan aims at 97%: more time, more steps
            if behind or ahead:
                plan = plan_steps(self.budget, self._elapsed(), self.step, per_step, self.steps_per_epoch, per_eval,
                                  old.seconds_final or 0.0, self.cfg.swa_fraction)
                if self.step > old.swa_start_step:  # averaging has begun: it goes on from where it started
                    plan.swa_start_step = old.swa_start_step
                else:  # not yet: it cannot start in the past
                    plan.swa_start_step = max(plan.swa_start_step, self.step)
                if ahead and plan.total_steps <= old.total_steps:
                    plan = None
        if self.dist.world > 1:
            shared = [plan]
            dist.broadcast_object_list(shared, src=0)
            plan = shared[0]
        if plan is not None:
            why = "behind" if plan.total_steps < self.plan.total_steps else "ahead of"
            self._log(f"time budget: {why} schedule, {self.plan.total_steps} -> {plan.total_steps} steps")
            self.plan = plan

    # -- loops --------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, batch_size: int, **kwargs) -> DataLoader:
        return make_loader(ds, batch_size, self.collate, self.num_workers, self.pin_memory, **kwargs)

    def _train_epoch(self, epoch: int) -> Dict[str, Any]:
        cfg = self.cfg
        self.sampler.set_epoch(epoch)  # the shuffle of this epoch; the loader (and its workers) is reused
        if self._train_loader is None:
            gen = torch.Generator()
            gen.manual_seed(cfg.seed)
            self._train_loader = self._loader(self.train_ds, self.per_rank_batch, sampler=self.sampler, generator=gen)
        loader = self._train_loader
        self.ddp.train()
        from tqdm.auto import tqdm

        planned = self.planned_epochs
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{planned or '?'}", unit="batch", leave=False,
                   disable=not (cfg.progress and self.dist.main and sys.stderr.isatty()), mininterval=1.0,
                   file=sys.stderr)
        loss_sum = torch.zeros((), dtype=torch.float64)
        n_seen, in_swa = 0, False
        # (loss, gradient norm) of the steps not yet read back: on a GPU they are read every
        # READ_EVERY steps in one transfer, not once a step, so that the host runs ahead of the device
        pending: List[Tuple[torch.Tensor, int, int, float]] = []
        read_every = READ_EVERY.get(self.device.type, READ_EVERY["cuda"])

        def read_back() -> None:
            nonlocal loss_sum, n_seen
            if not pending:
                return
            values = torch.stack([p[0] for p in pending]).tolist()  # the one device sync of read_every steps
            for (loss_v, gnorm_v), (_, n, step, lr) in zip(values, pending):
                if not (math.isfinite(loss_v) and math.isfinite(gnorm_v)):
                    raise TrainingDiverged(
                        f"non-finite training loss ({loss_v}) or gradient norm ({gnorm_v}) at epoch {epoch + 1}, "
                        f"step {step} (lr {lr:.3g}); try a smaller lr or check the targets")
                loss_sum += loss_v * n
                n_seen += n
            pending.clear()
        probe = self._probe if self.plan is None else None
        epoch_start = t0 = t_step = time.perf_counter()
        planning = 0.0
        for bg, y in loader:
            if self.plan is not None and self.step >= self.plan.total_steps:
                break  # a budgeted run may end mid-epoch
            bg = to_device(bg, self.device, non_blocking=True, backend=self.backend)
            y = y.to(self.device, non_blocking=True).reshape(len(y), -1)[:, 0].float()
            yn = self.normalizer.encode(y)
            pred = self.ddp(bg).reshape(-1)
            loss = F.l1_loss(pred, yn)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
            lr = self.lr_at(self.step)
            pending.append((torch.stack([loss.detach(), gnorm.to(loss.dtype)]), len(y), self.step + 1, lr))
            if len(pending) >= read_every:
                read_back()  # on CPU before the optimiser step: a non-finite step never changes the weights
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.step += 1
            if self.plan is not None and self.step > self.plan.swa_start_step:
                if self.swa is None:
                    self.swa = SWA(self.model)
                self.swa.update(self.model)
                in_swa = True
            now = time.perf_counter()
            if probe is not None:
                probe.add(now - t_step)
                # small epochs: the probe goes on into the next ones, so the plan never rests on warm-up steps
                if probe.counted >= 20 or self._elapsed() > 0.2 * self.budget:
                    read_back()  # the device catches up: the time so far is its time
                    now = time.perf_counter()
                    self.timers["train"] += now - t0  # the plan counts the time spent so far
                    self._make_plan(probe.seconds_per_step or (now - t_step))
                    t0 = time.perf_counter()
                    planning, now = t0 - now, t0
                    probe = None
            t_step = now
            bar.update(1)
            if n_seen and (bar.n % 5 == 0 or bar.n == self.steps_per_epoch):
                bar.set_postfix(loss=f"{float(loss_sum) / n_seen:.4f}",
                                cryst_s=f"{n_seen * self.dist.world / (now - epoch_start - planning + 1e-9):.0f}")
        read_back()
        end = time.perf_counter()
        self.timers["train"] += end - t0
        seconds = end - epoch_start - planning
        bar.close()
        stats = torch.tensor([float(loss_sum), float(n_seen)], dtype=torch.float64)
        if self.dist.world > 1:
            dist.all_reduce(stats)
        train_loss = float(stats[0] / stats[1])
        return {"train_loss": train_loss, "train_mae": train_loss * self.normalizer.std, "lr": self.lr_at(self.step - 1),
                "train_seconds": seconds, "crystals_per_second": float(stats[1]) / seconds, "swa": in_swa,
                "n_samples": int(stats[1]), "steps": self.step}

    @torch.no_grad()
    def predict(self, model: torch.nn.Module, ds: Dataset) -> Tuple[np.ndarray, np.ndarray]:
        """Predictions and targets (original units) for ``ds``; sharded across DDP ranks."""
        was_training = model.training
        model.eval()
        items = list(range(self.dist.rank, len(ds), self.dist.world))
        if id(ds) not in self._eval_loaders:  # one per dataset, its workers kept between evaluations
            self._eval_loaders[id(ds)] = (ds, self._loader(_Subset(ds, items), self.cfg.eval_batch_size, shuffle=False))
        loader = self._eval_loaders[id(ds)][1]
        preds, targets = [], []
        for bg, y in loader:
            preds.append(model(to_device(bg, self.device, non_blocking=True, backend=self.backend)).reshape(-1).double())
            targets.append(y.reshape(len(y), -1)[:, 0].double())
        model.train(was_training)
        p = self.normalizer.decode(torch.cat(preds).cpu()).numpy() if preds else np.zeros(0)
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
        if self.started_at is None:
            self.started_at = time.perf_counter()
        try:
            return self._fit(epoch_callback)
        finally:
            torch.use_deterministic_algorithms(self._deterministic_before)
            self._train_loader, self._eval_loaders = None, {}  # their worker processes end here
            if self.dist.owned and dist.is_initialized():
                dist.destroy_process_group()

    def _fit(self, epoch_callback) -> Dict[str, Any]:
        self._setup()
        cfg = self.cfg
        if cfg.resume:
            self._try_resume()
        length = (f"time budget {format_duration(self.budget)}" if self.budget is not None and self.plan is None else
                  f"{self.planned_epochs} epochs ({cfg.swa_epochs if self.budget is None else 'planned'} SWA)")
        self._log(f"{cfg.dataset}/{self.target}: {len(self.train_ds)} train, {len(self.val_ds)} val, "
                  f"{len(self.test_ds)} test crystals; frame {self.frame}, {self.n_params:,} parameters, "
                  f"{length}, {self.steps_per_epoch} steps an epoch, {cfg.schedule} schedule, device {self.device} "
                  f"(backend {self.backend})" + (f", {self.dist.world} ranks" if self.dist.world > 1 else ""))
        if self.init_from is not None:
            src = self.init_from
            self._log(f"fine-tuning from {src['path']} ({src['dataset']}/{src['target']}), a new target normaliser; "
                      f"{src['frozen_values']:,} parameters frozen ({cfg.freeze_blocks} blocks)")
        while self.plan is None or self.step < self.plan.total_steps:
            epoch, first_step = self.epoch, self.step
            t0 = time.perf_counter()
            metrics = self._train_epoch(epoch)
            t_val = time.perf_counter()
            val_mae = self.evaluate(self.model, self.val_ds)
            self.timers["validation"] += time.perf_counter() - t_val
            self.epoch = epoch + 1
            improved = val_mae < self.best_val
            t_ck = time.perf_counter()
            if improved:
                self.best_val, self.best_epoch = val_mae, self.epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                if self.dist.main:
                    atomic_torch_save(make_checkpoint("best", self.best_state, self.meta, epoch=self.epoch,
                                                      val_mae=val_mae), self.out / "best.pt")
            metrics.update(epoch=self.epoch, val_mae=val_mae, best_val_mae=self.best_val,
                           seconds=time.perf_counter() - t0)
            self.history.append(metrics)
            self._save_last()
            if self.dist.main:
                self._write_log()
            self.timers["checkpoints"] += time.perf_counter() - t_ck
            self._log(f"epoch {self.epoch}/{self.planned_epochs}  loss {metrics['train_loss']:.4f}  "
                      f"train MAE {metrics['train_mae']:.4g}  val MAE {val_mae:.4g} {self.unit}  "
                      f"lr {metrics['lr']:.2e}  {metrics['crystals_per_second']:.0f} cryst/s  "
                      f"{metrics['seconds']:.1f} s" + ("  SWA" if metrics["swa"] else "") + ("  *best" if improved else ""))
            if epoch_callback is not None:
                epoch_callback(self.epoch, dict(metrics))
            steps = self.step - first_step  # the speed now, not the average since the start
            self._check_budget(metrics["train_seconds"] / steps if steps >= 10 else None)
        return self._finish()

    def _write_log(self) -> None:
        keys = ["epoch", "steps", "train_loss", "train_mae", "val_mae", "best_val_mae", "lr", "swa", "train_seconds",
                "seconds", "crystals_per_second"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for row in self.history:
            w.writerow(row)
        atomic_write_text(self.out / "log.csv", buf.getvalue())

    def _finish(self) -> Dict[str, Any]:
        cfg = self.cfg
        t_final = time.perf_counter()
        models: Dict[str, Dict[str, Any]] = {}
        candidates = {"final": (self.model, self.epoch)}
        if self.swa is not None and self.swa.n_averaged > 0:
            candidates["swa"] = (self.swa.module, self.epoch)
        if self.best_state is not None:
            best_model = build_model(self.meta["model_config"]).to(self.device)
            best_model.sparse_backend = self.backend
            best_model.load_state_dict(self.best_state)
            candidates["best"] = (best_model, self.best_epoch)
        # the model asked for, or the schedule's and validation size's; the others are reported beside it
        reported = cfg.reported_model or default_reported_model(cfg.schedule, len(self.val_ds))
        reported = reported if reported in candidates else "final"
        predictions = {}
        for name, (model, epoch) in candidates.items():
            t0 = time.perf_counter()
            test_pred, test_true = self.predict(model, self.test_ds)
            latency = (time.perf_counter() - t0) / max(1, len(self.test_ds))
            val_mae = self.best_val if name == "best" else self.evaluate(model, self.val_ds)
            models[name] = {"val_mae": val_mae, "test_mae": float(np.mean(np.abs(test_pred - test_true))), "epoch": epoch}
            predictions[name] = (test_pred, test_true, latency)
        test_pred, test_true, latency = predictions[reported]
        final_model = candidates[reported][0]
        train_ids = set(_ids(self.train_ds))
        first = self.history[0] if self.history else {}
        steady = self.history[1:] if len(self.history) > 1 else self.history
        steady_seconds = sum(h["train_seconds"] for h in steady)
        result = {
            "dataset": cfg.dataset, "target": self.target, "unit": self.unit, "frame": self.frame,
            "preset": cfg.preset, "model_preset": cfg.model_preset, "sample_size_run": _sample_of(cfg.dataset) is not None,
            "n_train": len(self.train_ds), "n_val": len(self.val_ds), "n_test": len(self.test_ds),
            "split": self.info.get("split"),
            "reported_model": reported, "test_mae": models[reported]["test_mae"], "val_mae": models[reported]["val_mae"],
            "models": models, "best_val_mae": self.best_val, "best_epoch": self.best_epoch,
            "best_test_mae": models.get("best", {}).get("test_mae"),
            "test_mae_of_train_mean": float(np.mean(np.abs(test_true - self.normalizer.mean))),
            "params": self.n_params, "init_from": self.init_from, "schedule": cfg.schedule, "epochs": self.epoch, "steps": self.step,
            "swa_steps": self.swa.n_averaged if self.swa is not None else 0, "batch_size": cfg.batch_size,
            "plan": self.plan.as_dict() if self.plan is not None else None, "time_budget_seconds": self.budget,
            "train_seconds": self.timers["train"],
            "seconds_per_epoch": sum(h["seconds"] for h in self.history) / max(1, len(self.history)),
            # steady state: the first epoch (compilation, caches, warm-up) apart
            "crystals_per_second": (sum(h["n_samples"] for h in steady) / steady_seconds) if steady_seconds > 0 else None,
            "crystals_per_second_first_epoch": first.get("crystals_per_second"),
            "latency_ms_per_crystal": 1000.0 * latency,
            "device": str(self.device), "backend": self.backend, "threads": torch.get_num_threads(),
            "world_size": self.dist.world, "seed": cfg.seed, "normalizer": self.normalizer.as_dict(),
            "cutoff": self.cutoff, "out_dir": str(self.out), "checkpoint": str(self.out / "model.pt"),
            "train_test_overlap": len(train_ids & set(_ids(self.test_ds))),
            "dropped": dropped_counts(self.info),
            "config": _plain(asdict(cfg)),
        }
        if self.dist.main:
            atomic_torch_save(make_checkpoint(reported, final_model.state_dict(), self.meta, epoch=self.epoch,
                                              val_mae=models[reported]["val_mae"]), self.out / "model.pt")
            if "swa" in candidates:
                atomic_torch_save(make_checkpoint("swa", self.swa.module.state_dict(), self.meta, epoch=self.epoch,
                                                  val_mae=models["swa"]["val_mae"]), self.out / "swa.pt")
            split_ids = {"split": self.info.get("split"), "train": _ids(self.train_ds), "val": _ids(self.val_ds),
                         "test": _ids(self.test_ds)}
            atomic_write_text(self.out / "split_ids.json", json.dumps(split_ids) + "\n")
            with open(self.out / "test_predictions.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["id", f"{self.target}", "prediction"])
                for i, t, p in zip(_ids(self.test_ds), test_true, test_pred):
                    w.writerow([i, f"{t:.6g}", f"{p:.6g}"])
            if cfg.plots:
                try:
                    write_plots(self.out, self.history, test_true, test_pred, self.target, self.unit,
                                title=f"{cfg.dataset} {self.target}, frame {self.frame}",
                                reference="DFT" if dataset_spec(cfg.dataset) is not None else "true")
                except Exception as exc:  # plots are a convenience; never lose a run over them
                    self._log(f"warning: plots not written ({exc})")
        self.timers["final"] = time.perf_counter() - t_final
        result["seconds"] = {**{k: round(v, 3) for k, v in self.timers.items()}, "total": round(self._elapsed(), 3)}
        if self.dist.main:
            atomic_write_text(self.out / "results.json", json.dumps(result, indent=2) + "\n")
            others = ", ".join(f"{k} {v['test_mae']:.4g}" for k, v in models.items() if k != reported)
            self._log(f"test MAE {result['test_mae']:.4g} {self.unit} ({reported} model; {others}); "
                      f"{format_duration(self._elapsed())} in all; results in {self.out / 'results.json'}")
        self.result = result
        return result


def _refuse_unfinished_run(out: Path) -> None:
    """A run killed in ``out`` left its ``last.pt`` (and no newer ``results.json``): a new run there
    would overwrite it, so say how to continue it or to start over."""
    last, results = out / "last.pt", out / "results.json"
    if last.is_file() and not (results.is_file() and results.stat().st_mtime_ns >= last.stat().st_mtime_ns):
        raise ConfigError(f"{out} holds an unfinished run ({last}, no results.json after it): continue it with "
                          "--resume, start over with --overwrite (its files are replaced), or choose another --out")


def dropped_counts(info: Dict[str, Any], first: int = 20) -> Dict[str, Any]:
    """The entries the data loading left out (results.json ``dropped``): counts, and the first ids."""
    failed = dict(info.get("failed") or {})
    return {"missing_target": int(info.get("n_skipped_target") or 0),
            "missing_target_ids": list(info.get("skipped_ids") or [])[:first],
            "failed_structures": len(failed), "failed_structure_ids": dict(list(failed.items())[:first])}

def _sample_of(dataset: str) -> Optional[str]:
    """The full dataset that ``dataset`` is a sample of (the embedded MP sample: megnet), else None."""
    spec = dataset_spec(dataset)
    return spec.sample_of if spec is not None else None


def _plain(obj: Any) -> Any:
    """Tuples -> lists etc., so that configs compare equal after a checkpoint round trip."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def train_and_evaluate(cfg: TrainConfig, epoch_callback: Optional[Callable[[int, Dict[str, Any]], Any]] = None,
                       data: Any = None, started_at: Optional[float] = None) -> Dict[str, Any]:
    """Train, evaluate the reported model (SWA or best-validation, see ``reported_model``) on the
    test split, return the results.

    ``epoch_callback(epoch, metrics)`` runs after every epoch (after its checkpoint is written) with
    ``metrics`` holding at least ``val_mae``, ``train_loss``, ``train_mae``, ``lr``, ``seconds``;
    whatever it raises propagates (hpo uses that to prune).  ``data`` may be a preloaded
    ``DatasetSplits`` (the same split for several runs); ``started_at`` (``time.perf_counter()``)
    is when a time budget started counting, if before this call (e.g. before loading that data).
    A non-finite loss raises FloatingPointError.
    """
    return Trainer(cfg, data=data, started_at=started_at).fit(epoch_callback)


__all__ = ["SWA", "Trainer", "load_splits", "train_and_evaluate", "weight_decay_groups"]
