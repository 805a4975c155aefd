"""The report's charts, drawn with matplotlib's object API (a `Figure` per chart, no pyplot state) into PNG bytes."""

from __future__ import annotations

import io

import numpy as np

COLORS = ("#4c72b0", "#dd8452")  # A, B
SHARE_COLORS = {"target": "#55a868", "other_objects": "#c44e52", "background": "#8c8c8c"}


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def per_class_bars(names: list[str], values: list[list[float]], labels: list[str]) -> bytes:
    """Per-class IoU (percent) of each run side by side: ``values[run][class]``."""
    fig, ax = _figure(max(5.0, 0.5 * len(names) * len(values) + 1.5), 3.4)
    x = np.arange(len(names))
    width = 0.8 / len(values)
    for k, (vals, label) in enumerate(zip(values, labels)):
        ax.bar(x + (k - (len(values) - 1) / 2) * width, vals, width, label=label, color=COLORS[k % 2])
    ax.set_xticks(x, names, rotation=30 if max(map(len, names)) > 4 else 0, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def scatter(iou_a: np.ndarray, iou_b: np.ndarray, label_a: str, label_b: str) -> bytes:
    """Per-episode foreground IoU of B against A, with the diagonal (points above it: B better)."""
    fig, ax = _figure(4.2, 4.0)
    ax.plot([0, 100], [0, 100], color="#444", lw=1, ls="--", label="B = A")
    ax.scatter(iou_a, iou_b, s=9, alpha=0.5, color=COLORS[0], edgecolors="none")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_aspect("equal")
    ax.set_xlabel(f"A: {label_a} IoU (%)", fontsize=9)
    ax.set_ylabel(f"B: {label_b} IoU (%)", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def histogram(values: np.ndarray, xlabel: str, centre_line: bool) -> bytes:
    """Histogram of per-episode values (IoU, or B - A differences with a line at 0)."""
    fig, ax = _figure(4.6, 3.2)
    ax.hist(values, bins=40, color=COLORS[0], alpha=0.85)
    if centre_line:
        ax.axvline(0, color="#444", lw=1, ls="--")
        ax.axvline(float(np.mean(values)), color=COLORS[1], lw=1.5, label=f"mean {np.mean(values):+.1f}")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("episodes", fontsize=9)
    ax.grid(alpha=0.3)
    return _png(fig)


def shares(labels: list[str], shares_per_run: list[dict]) -> bytes:
    """Where each run's predicted foreground goes (share on the target, other objects, background), stacked."""
    fig, ax = _figure(5.6, 0.6 * len(labels) + 1.2)
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    for key, color in SHARE_COLORS.items():
        vals = np.array([100 * s[key] for s in shares_per_run])
        ax.barh(y, vals, left=left, color=color, label=key.replace("_", " "))
        left += vals
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("share of the predicted foreground (%)", fontsize=9)
    ax.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _png(fig)
