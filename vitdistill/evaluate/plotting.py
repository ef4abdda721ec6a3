"""Figure helpers shared by the evaluators' report plots and the report: Agg canvases, never pyplot
(thread-safe, no display), and one colour per evaluated model."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COLOURS = {"teacher": "tab:blue", "student": "tab:orange"}


def new_figure(w: float, h: float) -> Figure:
    """A ``w`` x ``h`` inch figure on an Agg canvas."""
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def grid(n: int, cols: int, w: float, h: float) -> tuple[Figure, list]:
    """A figure of ``n`` small panels, ``cols`` per row, each ``w`` x ``h`` inches."""
    cols = min(cols, n)
    rows_n = -(-n // cols)
    fig = new_figure(w * cols, h * rows_n)
    return fig, [fig.add_subplot(rows_n, cols, i + 1) for i in range(n)]
