"""PNG plots of runs, as bytes. Uses matplotlib's object API (Figure + Agg), never pyplot, so
no global backend or figure state is touched. Every function copes with NaNs, a single point
and a single group, and returns None when there is nothing to draw.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORS = [f"C{i}" for i in range(10)]


def color(i: int) -> str:
    return COLORS[i % len(COLORS)]


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def marker(points: int) -> str | None:
    return "o" if points <= 30 else None  # a lone evaluated round is still visible


def learning_curves(metric: str, curves: list[tuple[str, pd.DataFrame]]) -> bytes | None:
    """`metric` against round, one line per group: the mean over its runs, shaded from min to max.

    `curves`: (label, frame with columns round, mean, min, max) per group.
    """
    curves = [(label, c) for label, c in curves if len(c)]
    if not curves:
        return None
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    for i, (label, c) in enumerate(curves):
        ax.plot(c["round"], c["mean"], color=color(i), marker=marker(len(c)), markersize=3, label=label)
        if (c["min"] < c["max"]).any():
            ax.fill_between(c["round"], c["min"], c["max"], color=color(i), alpha=0.2, linewidth=0)
    ax.set(xlabel="round", ylabel=metric, title=f"{metric} (mean over seeds, band: min..max)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return png(fig)


def curve(frames: list[pd.DataFrame], metric: str) -> pd.DataFrame:
    """Mean, min and max of `metric` per round over several runs' metrics tables."""
    long = pd.concat([f[["round", metric]] for f in frames if metric in f and "round" in f] or [pd.DataFrame()])
    if metric not in long:
        return pd.DataFrame(columns=["round", "mean", "min", "max"])
    long = long.dropna()
    return long.groupby("round")[metric].agg(["mean", "min", "max"]).reset_index()


def utility_vs_epsilon(points: pd.DataFrame, utilities: list[str], labels: list[str]) -> bytes | None:
    """One panel per utility metric: its final value against final epsilon, one point per run:
    filled at the accounted epsilon, hollow at audit=epsilon's empirical estimate.

    `points`: columns epsilon, epsilon_empirical, the utilities and `group` (an index into
    `labels`, for colour).
    """
    kinds = [k for k in ("epsilon", "epsilon_empirical") if k in points]
    utilities = [u for u in utilities if any((points[k].notna() & points[u].notna()).any() for k in kinds)]
    if not utilities:
        return None
    fig = Figure(figsize=(5 * len(utilities) + 2, 4), dpi=100)
    axes = fig.subplots(1, len(utilities), squeeze=False)[0]
    for ax, utility in zip(axes, utilities):
        for g, label in enumerate(labels):
            for kind in kinds:
                mine = points[(points["group"] == g) & points[kind].notna() & points[utility].notna()]
                if len(mine):
                    empirical = kind == "epsilon_empirical"
                    ax.scatter(mine[kind], mine[utility], s=25, label=f"{label} (empirical)" if empirical else label,
                               color="none" if empirical else color(g), edgecolors=color(g))
        ax.set(xlabel="epsilon (final; hollow: empirical)", ylabel=utility, title=f"{utility} vs privacy")
        ax.grid(alpha=0.3)
    if len(labels) > 1:
        axes[-1].legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return png(fig)


def histogram(values: np.ndarray, *, xlabel: str, title: str) -> bytes | None:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    fig = Figure(figsize=(4, 2.5), dpi=80)
    ax = fig.add_subplot()
    bins: int | Sequence[float]
    if np.all(values == np.round(values)) and values.max() - values.min() <= 40:  # counts: one bar per value
        bins = np.arange(values.min() - 0.5, values.max() + 1.5).tolist()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        bins = min(30, max(1, len(np.unique(values))))
    ax.hist(values, bins=bins, color="C0", edgecolor="white")
    ax.set(xlabel=xlabel, ylabel="clients", title=title)
    return png(fig)


def lines(metrics: pd.DataFrame, columns: list[str], *, ylabel: str, title: str) -> bytes | None:
    """Small plot of some columns of a run's metrics table against round."""
    columns = [c for c in columns if c in metrics and metrics[c].notna().any()]
    if "round" not in metrics or not columns:
        return None
    fig = Figure(figsize=(4, 2.5), dpi=80)
    ax = fig.add_subplot()
    for i, c in enumerate(columns):
        rows = metrics[["round", c]].dropna()
        ax.plot(rows["round"], rows[c], color=color(i), marker=marker(len(rows)), markersize=3, label=c)
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if len(columns) > 1:
        ax.legend(fontsize="small")
    return png(fig)
