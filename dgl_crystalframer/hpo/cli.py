"""``dgl-crystalframer hpo ...`` runs a sweep, ``dgl-crystalframer report ...`` summarises one
(``python -m hpo`` and ``python -m hpo report`` from the repository root).  Needs the ``[hpo]``
extra (Optuna, SQLAlchemy, psycopg2)."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import signal
import warnings
from pathlib import Path

from ..config import TRAIN_PRESETS
from ..datasets import DATASETS, DEFAULT_DATASET
from ..errors import ConfigError, UserError
from . import space as space_mod
from .storage import DEFAULT_DB, GRACE_PERIOD, HEARTBEAT_INTERVAL, default_url

SWEEP_EPILOG = """\
search space (dgl_crystalframer/hpo/space.py; narrow it, never widen it):
{space}

examples:
  # laptop: 20 quick trials on the embedded sample, SQLite in runs/hpo/hpo.db (rerun to resume)
  {prog} --study eform --n-trials 20 --preset smoke
  # only two frame types and 2..4 layers, grid over the narrowed space
  {prog} --study grid1 --n-trials 50 --frames max,none --layers 2..4 --angle-basis 64 \\
      --batch-sizes 64 --sampler grid
  # several worker processes on one machine: a journal file instead of SQLite
  {prog} --study local4 --n-trials 40 --storage journal:runs/hpo/local4.journal   # in 4 shells
  # many machines, one study: run the same command on every worker
  {prog} --study jv --dataset dft_3d_2021 --target formation_energy_peratom \\
      --n-trials 200 --preset paper --storage postgresql://user:pw@dbhost/optuna
  # the paper's three models instead of frame x angle basis
  {prog} --study models --n-trials 12 --models crystalformer,default,lightweight
  # fine-tune a checkpoint (its architecture is fixed: lr and batch size are searched)
  {prog} --study ft --n-trials 10 --target log10_k_vrh --set init_from=runs/pretrain/model.pt
  # accuracy vs inference time (NSGA-II, no pruning)
  {prog} --study pareto --n-trials 40 --objectives mae,latency
  # results: tables, best_config.yaml for `dgl-crystalframer train --config`, plots
  dgl-crystalframer report --study eform
  # live view in the browser (pip install optuna-dashboard)
  optuna-dashboard sqlite:///runs/hpo/hpo.db

--n-trials is study-wide: a worker stops when the study holds N COMPLETE/PRUNED trials (all
workers together), after running N trials itself, or at --timeout. Trials that fail (exception,
NaN loss or MAE) are recorded as FAIL and the sweep goes on. With SQLite or PostgreSQL a worker
killed mid-trial stops sending heartbeats; after --grace-period another worker marks its trial
FAIL and runs its parameters again (--max-retry); journal files have no heartbeats: after killing
a journal worker, `dgl-crystalframer report --study S --storage journal:FILE --fail-stale` marks
its trial FAIL (and the next run of the sweep replaces it). Test hook:
HPO_TRAINER=module:function replaces the trainer.
"""


def require_optuna() -> None:
    """A clear error instead of an ImportError when the [hpo] extra is not installed."""
    missing = [m for m in ("optuna", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"the hpo commands need {' and '.join(missing)}: pip install 'dgl_crystalframer[hpo]'")


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def sweep_parser(prog: str = "dgl-crystalframer hpo") -> argparse.ArgumentParser:
    space_lines = "\n".join([f"  {k:16s} {p.describe()}" for k, p in space_mod.SPACE.items()]
                            + [f"  {k:16s} {p.describe()} (when narrowed; replaces {', '.join(r)})"
                               for k, (p, r) in space_mod.OPTIONAL.items()])
    p = argparse.ArgumentParser(
        prog=prog,
        description="Optuna sweep over CrystalFramer hyperparameters; each trial trains with "
        "dgl_crystalframer.training (as the train command does). See also: dgl-crystalframer report --help",
        epilog=SWEEP_EPILOG.format(space=space_lines, prog=prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("study")
    g.add_argument("--study", required=True, help="study name; reuse it to resume or to add workers")
    g.add_argument("--dataset", default=DEFAULT_DATASET,
                   help=f"TrainConfig.dataset: {', '.join(DATASETS)} or a path [default: {DEFAULT_DATASET}]")
    g.add_argument("--target", help="TrainConfig.target, e.g. e_form [default: the dataset's formation energy]")
    g.add_argument("--n-trials", type=_positive_int, default=20, metavar="N",
                   help="study-wide number of COMPLETE+PRUNED trials to reach (see below) [default: 20]")
    g.add_argument("--storage", metavar="URL",
                   help="sqlite:///FILE (default: sqlite:///OUT/hpo.db; one worker at a time), journal:FILE "
                        "(several processes on one machine), or postgresql://user:pw@host/db (many machines)")
    g.add_argument("--out", type=Path, default=Path("runs/hpo"), metavar="DIR",
                   help="output folder: default database, per-trial run folders (default: runs/hpo)")
    g.add_argument("--timeout", type=float, metavar="S", help="this worker stops starting trials after S seconds")
    g = p.add_argument_group("training")
    g.add_argument("--preset", default="quick", choices=tuple(TRAIN_PRESETS),
                   help="TrainConfig.preset (default: quick)")
    g.add_argument("--epochs", type=_positive_int, help="TrainConfig.epochs (default: the preset's)")
    g.add_argument("--time-budget", dest="time_budget", metavar="DURATION",
                   help="train each trial for this long (e.g. 5m), all included; replaces --epochs")
    g.add_argument("--device", help="TrainConfig.device (default: auto)")
    g.add_argument("--num-workers", type=int, dest="num_workers",
                   help="TrainConfig.num_workers: DataLoader workers per trial (default: 4 on a GPU, 0 on CPU)")
    g.add_argument("--seed", type=int, help="TrainConfig.seed (default: 123)")
    g.add_argument("--set", dest="fixed", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE", help="any other TrainConfig field, repeatable")
    g = p.add_argument_group("search")
    g.add_argument("--sampler", default="auto", choices=("auto", "tpe", "random", "grid", "nsga2"),
                   help="auto: tpe for one objective, nsga2 for two; grid: every point of the "
                   "narrowed space (lr: 3 log-spaced values)")
    g.add_argument("--objectives", default="mae", choices=("mae", "mae,latency"),
                   metavar="LIST",
                   help="mae (default): validation MAE; 'mae,latency': also measured inference ms per "
                   "crystal, two objectives (Pareto front)")
    g.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                   help="prune on per-epoch validation MAE (single objective only; default: median)")
    g.add_argument("--pruner-warmup", type=int, default=2, metavar="EPOCHS",
                   help="median pruner: epochs before a trial may be pruned (default: 2)")
    g.add_argument("--space", dest="space_file", metavar="FILE",
                   help="YAML narrowing the space (keys as below; optional 'fixed:' TrainConfig fields)")
    g.add_argument("--models", help="search the paper's model presets instead of frame and angle basis, e.g. "
                                    "crystalformer,default,lightweight")
    g.add_argument("--frames", help="e.g. max,none")
    g.add_argument("--layers", help="e.g. 2..4 or 2,4,8 or 4")
    g.add_argument("--angle-basis", help="angular basis size D, e.g. 16,64")
    g.add_argument("--lr", help="e.g. 2e-4..1e-3 or 5e-4")
    g.add_argument("--batch-sizes", help="e.g. 64,128")
    g = p.add_argument_group("workers")
    g.add_argument("--heartbeat-interval", type=_positive_int, default=HEARTBEAT_INTERVAL, metavar="S",
                   help=f"seconds between heartbeats of a running trial (default: {HEARTBEAT_INTERVAL})")
    g.add_argument("--grace-period", type=_positive_int, default=GRACE_PERIOD, metavar="S",
                   help="a RUNNING trial without heartbeat for S seconds is marked FAIL "
                   f"(default: {GRACE_PERIOD})")
    g.add_argument("--max-retry", type=int, default=1, metavar="K",
                   help="re-run a dead worker's trial up to K times (default: 1; 0: never)")
    g.add_argument("-v", "--verbose", action="store_true", help="Optuna's own logs and tracebacks")
    return p


def report_parser(prog: str = "dgl-crystalframer report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Print a study's best trials (frame x layers table, top trials, Pareto front), "
        "write OUT/STUDY/report/best_config.yaml for `dgl-crystalframer train --config`, trials.csv and "
        "Optuna's plots (HTML with plotly, PNG with matplotlib).",
    )
    p.add_argument("--study", required=True)
    p.add_argument("--storage", metavar="URL", help="default: sqlite:///OUT/hpo.db")
    p.add_argument("--out", type=Path, default=Path("runs/hpo"), metavar="DIR",
                   help="the sweep's output folder (default: runs/hpo); the report goes to "
                   "OUT/STUDY/report")
    p.add_argument("--top", type=_positive_int, default=10, help="rows in the top-trials table")
    p.add_argument("--set", dest="overrides", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE", help="override a field in best_config.yaml, e.g. preset=paper")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--fail-stale", action="store_true",
                   help="mark FAIL the RUNNING trials whose worker on this machine no longer runs (a worker killed "
                        "on a journal file, which has no heartbeats, leaves its trial RUNNING); rerun the sweep to "
                        "replace them")
    p.add_argument("--fail-trial", type=int, action="append", default=[], metavar="N",
                   help="mark the RUNNING trial N FAIL (a worker on another machine that is known to be dead); repeatable")
    return p


def _setup_logging(verbose: bool) -> None:
    import optuna

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("matplotlib", "PIL", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # Optuna then records the running trial as FAIL before we exit


def main_sweep(argv: list[str], prog: str = "dgl-crystalframer hpo") -> int:
    args = sweep_parser(prog).parse_args(argv)
    require_optuna()
    _setup_logging(args.verbose)
    from .sweep import SweepSettings, run_sweep

    specs: dict = {}
    fixed: dict = {}
    if args.space_file:
        specs, fixed = space_mod.load_space_file(args.space_file)
    for flag, name in space_mod.CLI_FLAGS.items():
        if getattr(args, flag) is not None:
            specs[name] = getattr(args, flag)
    for key in ("epochs", "time_budget", "device", "num_workers", "seed"):
        if getattr(args, key) is not None:
            fixed[key] = getattr(args, key)
    fixed.update(dict(args.fixed))
    space = space_mod.build_space(specs, fine_tuning=bool(fixed.get("init_from")))
    clash = set(fixed) & set(space)
    if clash:
        raise ConfigError(f"{sorted(clash)} are searched; narrow them (e.g. --layers 4) instead")
    settings = SweepSettings(
        study=args.study, dataset=args.dataset, target=args.target, n_trials=args.n_trials,
        storage=args.storage, preset=args.preset, timeout=args.timeout, sampler=args.sampler,
        objectives=tuple(args.objectives.split(",")), pruner=args.pruner,
        pruner_warmup=args.pruner_warmup, space=space, fixed=fixed, out=args.out,
        heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        max_retry=args.max_retry,
    )
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        run_sweep(settings)
    except KeyboardInterrupt:
        logging.getLogger("hpo").warning("interrupted; run the same command to resume the study")
        return 130
    return 0


def main_report(argv: list[str], prog: str = "dgl-crystalframer report") -> int:
    args = report_parser(prog).parse_args(argv)
    require_optuna()
    _setup_logging(False)
    from .report import run_report

    storage = args.storage
    if storage is None:
        db = args.out / DEFAULT_DB
        if not db.exists():
            raise ConfigError(f"no {db}; give --storage URL or the sweep's --out DIR")
        storage = default_url(args.out)
    out = args.out / args.study / "report"
    run_report(args.study, storage, out, top=args.top, overrides=dict(args.overrides),
               plots=not args.no_plots, fail_stale=args.fail_stale, fail_trials=args.fail_trial)
    return 0


__all__ = ["main_report", "main_sweep", "report_parser", "sweep_parser"]
