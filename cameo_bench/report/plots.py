"""PNG figures of a report (matplotlib, Agg backend: reports are built on headless machines)."""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cameo_bench.report.curves import align  # noqa: E402
from cameo_bench.report.floors import LINE_STYLES  # noqa: E402

BASELINE_STYLES = ["--", ":", "-."]  # baselines in black; one style each when read at several layers


def _axes(n: int, width: float = 5.5, height: float = 3.8):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def _grid_and_legend(ax) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22))  # below: long labels hide curves


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)  # reports draw many figures: free each one
    return path


def convergence(panels: dict[str, list[tuple[str, bool, list]]], metric: str, path: pathlib.Path, *,
                floors: dict[str, list[tuple[str, str, float]]] | None = None, xlabel: str = "step") -> pathlib.Path:
    """One panel per backbone; per arm the seed mean and the min-max band over seeds.

    `panels[backbone] = [(label, is_baseline, curves), ...]` with one `[(step, value), ...]` per seed;
    `floors[backbone] = [(label, floor name, value), ...]` are drawn as horizontal lines.
    """
    fig, axes = _axes(len(panels))
    for ax, (backbone, arms) in zip(axes, panels.items()):
        dashes = iter(BASELINE_STYLES * len(arms))
        for label, baseline, curves in arms:
            steps, values = align(curves)  # [T], [R, T]
            style = dict(color="black", linestyle=next(dashes)) if baseline else {}
            (line,) = ax.plot(steps, values.mean(0), label=f"{label} (n={len(curves)})", **style)
            if len(curves) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.15, linewidth=0)
        for label, name, value in (floors or {}).get(backbone, []):
            ax.axhline(value, linewidth=1.0, label=label, **LINE_STYLES[name])
        ax.set_title(backbone)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        _grid_and_legend(ax)
    fig.suptitle(f"{metric}: mean over seeds, band = min..max")
    return _save(fig, path)


def speedups(panels: dict[str, list[tuple[str, object]]], path: pathlib.Path) -> pathlib.Path:
    """Speed-up against the threshold's position between the baseline's first and final value.

    `panels[backbone] = [(label, Comparison), ...]`; a variant that never reaches a threshold is drawn at 0.
    """
    fig, axes = _axes(len(panels))
    for ax, (backbone, rows) in zip(axes, panels.items()):
        for label, comp in rows:
            x = np.asarray(comp.fractions)
            y = np.asarray(comp.speedup, dtype=float)
            ci = np.asarray(comp.speedup_ci, dtype=float)  # [F, 2]
            err = np.abs(np.stack([y - ci[:, 0], ci[:, 1] - y]))
            err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(backbone)
        ax.set_xlabel("threshold: fraction of the baseline's improvement (1 = its final value)")
        ax.set_ylabel("speed-up (iterations baseline / variant)\nnot reached = 0")
        _grid_and_legend(ax)
    return _save(fig, path)


def layer_profile(layers: list[str], arms: list[tuple[str, list[float], str | None]], backbone: str,
                  path: pathlib.Path) -> pathlib.Path:
    """Final attention-correspondence PCK@1 of every layer; `arms = [(label, values per layer, supervised layer)]`."""
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(layers) + 2), 3.8))
    x = np.arange(len(layers))
    for label, values, layer in arms:
        baseline = label == "baseline"
        (line,) = ax.plot(x, values, marker="o", label=label, **(dict(color="black", linestyle="--") if baseline else {}))
        if layer in layers:
            i = layers.index(layer)
            ax.plot([x[i]], [values[i]], marker="*", markersize=14, color=line.get_color())
    ax.set_xticks(x, layers, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("PCK@1 (final step)")
    ax.set_title(f"{backbone}: PCK@1 per layer (* = supervised)")
    _grid_and_legend(ax)
    return _save(fig, path)
