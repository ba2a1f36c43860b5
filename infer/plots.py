"""The report's figures (python -m infer report): small PNGs written next to report.md, each function
returning the file name the markdown links to. matplotlib draws to files only (the Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd

matplotlib.use("Agg")  # files only: training boxes and CI have no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

CLASSES = ("A wins", "B wins", "tie")
DPI = 100


def no_rows_note(c: int) -> str:
    return f"no rows of class {CLASSES[c]}"


def save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path.name


def plot_reliability(table: pd.DataFrame, path: Path) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for c, (ax, name) in enumerate(zip(axes, CLASSES)):
        part = table[table["class"] == name]
        if part.empty:  # a class the truth never holds (reliability leaves it out)
            ax.text(0.5, 0.5, no_rows_note(c), ha="center", va="center", fontsize=9)
            ax.set(xticks=[], yticks=[], title=f"P({name})")
            continue
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.plot(part["mean_pred"], part["observed"], marker="o")
        for x, y, n in zip(part["mean_pred"], part["observed"], part["count"]):
            ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"P({name})", xlabel="mean predicted", ylabel="observed frequency")
    return save(fig, path)


def plot_confusion(cm: np.ndarray, path: Path, true_classes: list[int] | None = None) -> str:
    """Counts and row shares; rows: `true_classes` (default all), so a class with no true row can be left out."""
    rows = list(range(len(CLASSES))) if true_classes is None else true_classes
    cm = cm[rows]
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, values, title, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9)
        ax.set(xticks=range(3), yticks=range(len(rows)), xticklabels=CLASSES, yticklabels=[CLASSES[c] for c in rows],
               xlabel="predicted (argmax)", ylabel="true", title=title)
    return save(fig, path)


def plot_lengths(tables: dict[str, pd.DataFrame], path: Path) -> str:
    fig, axes = plt.subplots(1, len(tables), figsize=(9, 3.2))
    for ax, (what, table) in zip(np.atleast_1d(axes), tables.items()):
        x = np.arange(len(table))
        ax.bar(x - 0.2, table["log_loss"], 0.4, label="model")
        ax.bar(x + 0.2, table["prior"], 0.4, label="class prior")
        ax.set_xticks(x, table["chars"], rotation=30, fontsize=7)
        ax.set(title=f"log loss by {what} (chars)", ylabel="log loss", ylim=(0, 1.25 * table[["log_loss", "prior"]].max().max()))
        ax.legend(fontsize=7, ncols=2, loc="upper center")
    return save(fig, path)


def plot_bias(diff: np.ndarray, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(diff, bins=40, color="tab:purple")
    ax.axvline(0, c="grey", ls="--", lw=1)
    ax.set(xlabel="P(A) plain pass - P(A) swapped pass", ylabel="rows", title="position bias per row")
    return save(fig, path)
