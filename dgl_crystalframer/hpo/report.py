"""``dgl-crystalframer report``: tables of a study, the best config as YAML, Optuna's standard plots.

Reads any Optuna study (it writes nothing to the database, except with ``fail_stale`` /
``fail_trials``: a worker killed on a journal file, which keeps no heartbeats, leaves its trial
RUNNING for ever; those mark such trials FAIL). Outputs in OUT:
  best_config.yaml   TrainConfig keys only: `dgl-crystalframer train --config best_config.yaml`
  trials.csv         every trial (study.trials_dataframe())
  plots/NAME.html    plotly (needs `plotly`); plots/NAME.png via optuna.visualization.matplotlib
A missing plotting backend or a plot that cannot be drawn yet (e.g. importances from one trial)
gives a warning, never an error.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError
from .objective import OBJECTIVES
from .space import FRAMES, SPACE
from .storage import make_storage, redact, require_existing, worker_alive
from .sweep import SETTINGS_ATTR

log = logging.getLogger("hpo")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]

    def line(row):  # first column left-aligned (labels), numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def objective_names(study: optuna.Study) -> list[str]:
    names = study.user_attrs.get(SETTINGS_ATTR, {}).get("objectives")
    if not names or len(names) != len(study.directions):
        names = list(OBJECTIVES)[: len(study.directions)]
    return [OBJECTIVES.get(n, n) for n in names]


def pivot(trials: Sequence[FrozenTrial], row: str = "frame", col: str = "num_layers") -> str | None:
    """Best first objective (val MAE) per (frame, num_layers); None if the params are absent."""
    best: dict[tuple, float] = {}
    for t in trials:
        if row in t.params and col in t.params and t.values:
            key = (t.params[row], t.params[col])
            best[key] = min(best.get(key, math.inf), t.values[0])
    if not best:
        return None
    rows = sorted({k[0] for k in best}, key=lambda f: (FRAMES.index(f) if f in FRAMES else 99, f))
    cols = sorted({k[1] for k in best})
    body = [[r] + [best.get((r, c)) for c in cols] for r in rows]
    return table([f"{row} \\ {col}"] + [str(c) for c in cols], body)


def trial_rows(trials: Sequence[FrozenTrial], names: Sequence[str], params: Sequence[str]):
    header = ["trial", *names, "test_mae", *params, "seconds"]
    rows = []
    for t in trials:
        result = t.user_attrs.get("result", {})
        secs = t.duration.total_seconds() if t.duration else None
        rows.append([t.number, *t.values, result.get("test_mae"), *(t.params.get(p) for p in params), secs])
    return header, rows


def best_config(study: optuna.Study, trial: FrozenTrial, overrides: Mapping[str, Any]) -> dict:
    """The TrainConfig fields the sweep set for this trial (dataset, target, preset, fixed
    settings, searched params); everything else keeps TrainConfig's defaults, so e.g.
    overrides={"preset": "paper"} retrains the best architecture with the paper schedule."""
    config = dict(trial.user_attrs.get("train_args") or {})
    if not config:  # a trial not run by this version of hpo: rebuild from the study settings
        settings = study.user_attrs.get(SETTINGS_ATTR, {})
        config = {k: settings[k] for k in ("dataset", "target", "preset") if k in settings}
        config.update(settings.get("fixed", {}))
    config.update(trial.params)
    if config.get("preset") in RETRAIN_PRESET and "preset" not in overrides:
        config["preset"] = RETRAIN_PRESET[config["preset"]]
    config.update(overrides)
    return config


# A sweep's preset that must not be retrained as such: smoke builds a tiny model (it checks the
# plumbing), so best_config.yaml trains the searched settings with the default preset instead.
RETRAIN_PRESET = {"smoke": "quick"}


def trial_preset(study: optuna.Study, trial: FrozenTrial) -> Any:
    """The training preset a trial ran with."""
    return (trial.user_attrs.get("train_args") or study.user_attrs.get(SETTINGS_ATTR) or {}).get("preset")


def mark_failed(study: optuna.Study, storage: Any, stale: bool, numbers: Sequence[int]) -> list[str]:
    """Mark RUNNING trials FAIL: with ``stale``, those whose worker (``host:pid``) on this machine no
    longer runs; and the trials ``numbers``, wherever their worker was.  Returns what it did, in lines."""
    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    missing = [n for n in numbers if n not in running]
    if missing:
        raise ConfigError(f"--fail-trial: no RUNNING trial {', '.join(map(str, missing))} in study {study.study_name!r} "
                          f"(RUNNING: {sorted(running) or 'none'})")
    study_id = storage.get_study_id_from_name(study.study_name)
    lines = []
    for number, t in sorted(running.items()):
        worker = t.user_attrs.get("worker", "?")
        alive = worker_alive(worker)
        if number in numbers:
            why = "marked failed with --fail-trial"
        elif stale and alive is False:
            why = f"its worker {worker} no longer runs"
        else:
            if stale:
                lines.append(f"trial {number} RUNNING on {worker}: left as it is ("
                             + ("its worker still runs)" if alive else "another machine: --fail-trial "
                                                                        f"{number} marks it failed)"))
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        storage.set_trial_user_attr(trial_id, "error", f"marked FAIL by report: {why}")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        lines.append(f"trial {number} RUNNING -> FAIL ({why})")
    if stale and not lines:
        lines.append("no RUNNING trials")
    return lines


def write_yaml(path: Path, config: Mapping[str, Any], comment: str) -> None:
    import yaml

    text = "".join(f"# {line}\n" for line in comment.splitlines())
    path.write_text(text + yaml.safe_dump(dict(config), sort_keys=False))


def metric_labels(study: optuna.Study, names: Sequence[str]) -> list[str]:
    """The objectives as the plots' axes name them: the metric and its unit, e.g. "val_mae (eV/atom)"."""
    results = [t.user_attrs.get("result") or {} for t in study.get_trials(deepcopy=False)]
    unit = next((r["unit"] for r in results if r.get("unit")), "")
    return [f"{n} ({unit})" if n == OBJECTIVES["mae"] and unit else n for n in names]


# axis titles Optuna's plots have no argument for: (plot, x title, y title); None keeps Optuna's
AXES = {"intermediate_values": ("epoch", 0), "optimization_history": (None, 0)}


def _label_axes(fig: Any, name: str, labels: Sequence[str]) -> None:
    """Name the axes of a plotly figure or matplotlib Axes by epoch and metric (Optuna says "Step" /
    "Objective Value")."""
    if name not in AXES:
        return
    x, y = AXES[name][0], labels[AXES[name][1]]
    if hasattr(fig, "update_layout"):
        fig.update_layout(**({"xaxis_title": x} if x else {}), yaxis_title=y)
    else:
        if x:
            fig.set_xlabel(x)
        fig.set_ylabel(y)


def save_plots(study: optuna.Study, out: Path, names: Sequence[str]) -> list[Path]:
    """Optimisation history, parameter importances, intermediate values / Pareto front."""
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    multi = len(names) > 1
    labels = metric_labels(study, names)
    first: dict[str, Any] = {"target_name": labels[0]}
    if multi:
        first = {"target": lambda t: t.values[0], "target_name": labels[0]}
    plots: list[tuple[str, Callable, Callable, dict]] = [
        ("optimization_history", vis.plot_optimization_history, vis_mpl.plot_optimization_history, first),
        ("param_importances", vis.plot_param_importances, vis_mpl.plot_param_importances, first),
    ]
    if multi:
        plots.append(("pareto_front", vis.plot_pareto_front, vis_mpl.plot_pareto_front,
                      {"target_names": list(labels)}))
    else:
        plots.append(("intermediate_values", vis.plot_intermediate_values,
                      vis_mpl.plot_intermediate_values, {}))
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        have_html, have_png = vis.is_available(), vis_mpl.is_available()
    if not have_html:
        log.warning("plotly is not installed: no HTML plots (pip install plotly)")
    if not have_png:
        log.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
    else:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    written = []
    for name, plotly_fn, mpl_fn, kwargs in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning, empty-data warnings
            if have_html:
                try:
                    path = out / f"{name}.html"
                    fig = plotly_fn(study, **kwargs)
                    _label_axes(fig, name, labels)
                    fig.write_html(path, include_plotlyjs="directory")
                    written.append(path)
                except Exception as e:
                    log.warning("plot %s (html) skipped: %s", name, e)
            if have_png:
                try:
                    ax = mpl_fn(study, **kwargs)
                    _label_axes(ax if not hasattr(ax, "flat") else ax.flat[0], name, labels)
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    path = out / f"{name}.png"
                    fig.savefig(path, dpi=100, bbox_inches="tight")
                    plt.close(fig)
                    written.append(path)
                except Exception as e:
                    log.warning("plot %s (png) skipped: %s", name, e)
    return written


def run_report(
    study_name: str,
    storage_url: str,
    out: Path,
    top: int = 10,
    overrides: Mapping[str, Any] | None = None,
    plots: bool = True,
    echo: Callable[[str], None] = print,
    fail_stale: bool = False,
    fail_trials: Sequence[int] = (),
) -> dict:
    require_existing(storage_url)
    storage = make_storage(storage_url, heartbeat=False)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        names = optuna.get_all_study_names(storage)
        raise ConfigError(
            f"no study {study_name!r} in {redact(storage_url)}; studies there: {names}"
        ) from None
    names = objective_names(study)
    if fail_stale or fail_trials:
        for line in mark_failed(study, storage, fail_stale, fail_trials):
            echo(line)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    echo(f"study {study_name!r} ({redact(storage_url)}): "
         + ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    settings = study.user_attrs.get(SETTINGS_ATTR)
    if settings:
        echo("settings: " + ", ".join(f"{k}={settings[k]}" for k in ("dataset", "target", "preset")
                                       if k in settings))
    files: dict[str, Any] = {}
    if not complete:
        echo("no COMPLETE trial yet")
        return files

    view = pivot(complete)
    if view:
        echo(f"\nbest {names[0]} by frame x num_layers (COMPLETE trials):\n{view}")
    seen = {p for t in complete for p in t.params}
    params = [p for p in SPACE if p in seen] + sorted(seen - set(SPACE))
    ranked = sorted(complete, key=lambda t: t.values[0])[:top]
    header, rows = trial_rows(ranked, names, params)
    echo(f"\ntop {len(ranked)} trials by {names[0]}:\n{table(header, rows)}")
    if len(names) > 1:
        front = sorted(study.best_trials, key=lambda t: t.values[0])
        header, rows = trial_rows(front, names, params)
        echo(f"\nPareto front ({' vs '.join(names)}), {len(front)} trials:\n{table(header, rows)}")
        best = front[0]
    else:
        best = study.best_trial

    out.mkdir(parents=True, exist_ok=True)
    config = best_config(study, best, overrides or {})
    values = ", ".join(f"{n}={v:.5g}" for n, v in zip(names, best.values))
    path = out / "best_config.yaml"
    write_yaml(path, config,
               f"best trial {best.number} of study {study_name!r}: {values}\n"
               f"train it: dgl-crystalframer train --config {path.name}")
    files["best_config"] = path
    echo(f"\nbest trial {best.number} ({values}) -> {path}")
    swapped = trial_preset(study, best)
    if swapped in RETRAIN_PRESET and "preset" not in (overrides or {}):
        echo(f"note: the sweep used preset {swapped} (a tiny model); {path.name} trains its settings with preset "
             f"{RETRAIN_PRESET[swapped]} (--set preset=... chooses another)")
    try:
        csv = out / "trials.csv"
        study.trials_dataframe().to_csv(csv, index=False)
        files["trials_csv"] = csv
    except Exception as e:  # pandas missing
        log.warning("trials.csv skipped: %s", e)
    if plots:
        files["plots"] = save_plots(study, out / "plots", names)
        echo(f"plots: {len(files['plots'])} files in {out / 'plots'}")
    return files
