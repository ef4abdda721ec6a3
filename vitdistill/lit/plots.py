"""LiT loss curves, on :class:`matplotlib.figure.Figure` with an Agg canvas (never pyplot)."""

from __future__ import annotations

import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def loss_curve_figure(history: list[dict], title: str) -> Figure:
    """Train and val loss per epoch (left axis) and the learned temperature (right axis)."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [row["epoch"] for row in history]
    ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
    val = [row["val_loss"] for row in history]
    if not all(math.isnan(v) for v in val):
        ax.plot(epochs, val, marker="s", label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("contrastive loss")
    ax.set_title(title)
    twin = ax.twinx()
    twin.plot(epochs, [row["temperature"] for row in history], color="grey", linestyle="--", label="temperature t")
    twin.set_ylabel("temperature t (logit scale)")
    lines = ax.get_lines() + twin.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    return fig
