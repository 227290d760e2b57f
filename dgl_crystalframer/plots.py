"""The plots of a training run: the test set's parity plot and the learning curve."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np


def write_plots(out_dir: Path, history: List[Dict[str, Any]], y_true: np.ndarray, y_pred: np.ndarray,
                target: str, unit: str, title: str = "", reference: str = "true") -> None:
    """``parity.png`` (test set) and ``learning_curve.png`` (train/val MAE per epoch) in ``out_dir``;
    ``reference`` names where the test values come from on the parity plot's x axis (e.g. "DFT")."""
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
    ax.set_xlabel(f"{reference} {label}")
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


__all__ = ["write_plots"]
