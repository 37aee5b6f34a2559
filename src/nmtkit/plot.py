"""Figures: a run's training curves (`nmtkit plot RUN_DIR`) and the reliability diagram of `nmtkit evaluate --plot`.

matplotlib is an optional dependency (`pip install matplotlib`, or the `plot` extra), imported only when a figure is drawn, so the
rest of nmtkit works without it. Figures are drawn on matplotlib's Agg canvas directly, not through pyplot, so no
GUI backend is touched and no global figure state is left behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calibration import Calibration


class PlotError(RuntimeError):
    """A figure can't be drawn: matplotlib is missing, or the run has no usable metrics."""


def require_matplotlib() -> None:
    """Raise PlotError naming the install command when matplotlib can't be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(
            "plotting needs matplotlib, which is not installed; install it with: pip install matplotlib (in a clone of nmtkit: pip install -e '.[plot]')"
        ) from None


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass
class TrainingCurves:
    """The series of metrics.jsonl, by event kind. tokens_seen is missing (None) in runs that predate it."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_tokens: list[int | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    valid_steps: list[int] = field(default_factory=list)
    valid_loss: list[float] = field(default_factory=list)
    valid_tokens: list[int | None] = field(default_factory=list)


def read_training_curves(run_dir: str | Path) -> TrainingCurves:
    """Parse RUN_DIR/metrics.jsonl; PlotError names the file and line of anything unusable."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"no metrics to plot: {path} not found; give a run directory that training has logged to (train.run_dir)")
    train: list[dict] = []
    valid: list[dict] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise PlotError(f"{path}:{n}: not a metrics record (a JSON object with an integer \"step\"): {line[:80]}")
        # A resumed run trains again from its checkpoint's step: what the stopped run logged after that step
        # belongs to an abandoned stretch. Training marks the resume; logs without the mark are cut where the
        # steps go back.
        for records, key in ((train, "train_loss"), (valid, "valid_loss")):
            if record.get("resumed"):
                while records and records[-1]["step"] > record["step"]:
                    records.pop()
            elif key in record:
                while records and records[-1]["step"] >= record["step"]:
                    records.pop()
                records.append(record)
    curves = TrainingCurves()
    for record in train:
        curves.train_steps.append(record["step"])
        curves.train_loss.append(record["train_loss"])
        curves.train_tokens.append(record.get("tokens_seen"))
        curves.lr.append(record["lr"])
    for record in valid:
        curves.valid_steps.append(record["step"])
        curves.valid_loss.append(record["valid_loss"])
        curves.valid_tokens.append(record.get("tokens_seen"))
    if not curves.train_steps and not curves.valid_steps:
        raise PlotError(f"{path} has no train_loss or valid_loss records yet")
    return curves


def _plot_losses(ax: Any, train_x: list, curves: TrainingCurves, valid_x: list, xlabel: str) -> None:
    """Train and valid loss against one x axis; points whose x is unknown (None) are left out."""
    for x, y, label, style in (
        (train_x, curves.train_loss, "train (with train.label_smoothing)", "-"),
        (valid_x, curves.valid_loss, "valid (plain cross-entropy)", "o-"),
    ):
        points = [(a, b) for a, b in zip(x, y) if a is not None]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_training_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw loss against step and against target tokens seen, and the learning rate, into `out`
    (default RUN_DIR/curves.png). Returns the path written."""
    curves = read_training_curves(run_dir)
    fig = _new_figure(15, 4)
    by_step, by_tokens, lr = fig.subplots(1, 3)
    _plot_losses(by_step, curves.train_steps, curves, curves.valid_steps, "step")
    _plot_losses(by_tokens, curves.train_tokens, curves, curves.valid_tokens, "target tokens seen")
    if not any(t is not None for t in curves.train_tokens + curves.valid_tokens):
        by_tokens.set_title("metrics.jsonl has no tokens_seen")
    lr.plot(curves.train_steps, curves.lr)
    lr.set_xlabel("step")
    lr.set_ylabel("learning rate")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    return _save(fig, Path(out) if out is not None else Path(run_dir) / "curves.png", "--out")


def plot_reliability(calibration: Calibration, path: str | Path) -> Path:
    """Reliability diagram: accuracy per confidence bin against the diagonal of perfect calibration, and below
    it the number of target positions per bin. Returns the path written."""
    bins = calibration.bins
    centres = [(b.lower + b.upper) / 2 for b in bins]
    width = bins[0].upper - bins[0].lower
    fig = _new_figure(5.5, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    filled = [b for b in bins if b.count]
    top.bar(centres, [b.accuracy for b in bins], width=width, edgecolor="black", linewidth=0.5, label="accuracy")
    top.plot(
        [b.mean_confidence for b in filled], [b.accuracy for b in filled], "o", color="C1", markersize=4, label="mean confidence"
    )
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy (argmax = reference)")
    top.set_ylim(0, 1)
    top.set_title(f"ECE {calibration.ece:.4f}, mean entropy {calibration.mean_entropy:.3f} nats, {calibration.tokens:,} tokens")
    top.legend(loc="upper left")
    counts = [b.count for b in bins]
    bottom.bar(centres, counts, width=width, edgecolor="black", linewidth=0.5, color="C2")
    nonzero = [c for c in counts if c]
    if nonzero and max(nonzero) > 100 * min(nonzero):
        bottom.set_yscale("log")  # counts pile up near 1.0; a log axis keeps the rest visible
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("tokens")
    bottom.set_xlim(0, 1)
    return _save(fig, Path(path), "--plot")


def _save(fig: Any, path: Path, flag: str) -> Path:
    """Write the figure, or a PlotError naming the file and the flag that puts it elsewhere (a read-only run directory)."""
    kind = path.suffix[1:].lower() or "png"  # no suffix: PNG, written under the very name given
    if kind not in (known := fig.canvas.get_supported_filetypes()):
        raise PlotError(f"{flag} {path}: {path.suffix!r} is not an image format matplotlib writes; end the name in one of"
                        f" {', '.join('.' + k for k in sorted(known))} (e.g. {path.with_suffix('.png').name})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format=kind)
    except OSError as e:
        raise PlotError(f"could not write {path}: {e.strerror or e}; write the figure elsewhere with {flag}") from None
    return path
