"""Attainment curves as PNG, one per policy: what `bench serve` and `tokenpool sim` draw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

XLABELS = {"rate_per_model": "requests per second, per model", "models": "number of models"}


@dataclass(frozen=True)
class Curve:
    label: str
    loads: Sequence[float]
    attainments: Sequence[float]  # 0-1
    dashed_after: str | None = None  # the label of a solid curve this one shares a colour with


def plot_attainment(curves: Sequence[Curve], sweep: str, title: str, path: Path) -> None:
    """Mean SLO attainment (%) against the sweep's load, a 90% line, to path (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {}
    for curve in curves:
        style = {"marker": "o"}
        if curve.dashed_after is not None:
            style = {"linestyle": "--", "color": colours[curve.dashed_after]}
        line, = ax.plot(curve.loads, [a * 100 for a in curve.attainments], label=curve.label, **style)
        colours[curve.label] = line.get_color()
    ax.axhline(90, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(XLABELS[sweep])
    ax.set_ylabel("mean SLO attainment (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    tmp.replace(path)
