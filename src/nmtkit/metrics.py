"""The run's metrics: `metrics.jsonl` always, mirrored to TensorBoard when `train.tensorboard` is on.

metrics.jsonl holds one JSON object per log line or validation pass (what `nmtkit plot` reads), and a
`{"step": N, "resumed": true}` mark where a resumed run goes on from its checkpoint at step N. With
TensorBoard, every number of a record becomes a scalar at the record's step: `train_loss` is logged as
`train/loss`, `valid_ppl` as `valid/ppl`, and anything else (`lr`, `tgt_tokens_per_s`, ...) under `train/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

_NOT_SCALARS = {"step", "epoch", "resumed"}


class TensorBoardMissingError(RuntimeError):
    """train.tensorboard is on but the tensorboard package is not installed."""


def open_tensorboard(log_dir: Path, purge_step: int | None = None) -> Any:
    """A SummaryWriter for `log_dir`, or a clear error naming the setting and the package to install. `purge_step`:
    TensorBoard hides what earlier writers logged at that step and after (a resumed run logs those steps again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError itself when the tensorboard package is absent
        raise TensorBoardMissingError(
            "train.tensorboard is true but the tensorboard package is not installed; "
            "run `pip install tensorboard` (in a clone of nmtkit: `pip install -e '.[tensorboard]'`), or set train.tensorboard: false"
        ) from e
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


def scalar_tag(key: str) -> str:
    """`train_loss` -> `train/loss`, `valid_acc` -> `valid/acc`, `lr` -> `train/lr`."""
    for group in ("train", "valid"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1 :]}"
    return f"train/{key}"


class MetricsLog:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.tensorboard_dir = tensorboard_dir
        self.writer = open_tensorboard(tensorboard_dir) if tensorboard_dir is not None else None

    def resumed_at(self, step: int) -> None:
        """Mark a resume (or a restart over earlier records): what was logged after `step` is redone. metrics.jsonl
        gets a record that `nmtkit plot` cuts at; TensorBoard a writer that purges those steps, which it would
        otherwise draw twice."""
        self.write(step=step, resumed=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = open_tensorboard(cast(Path, self.tensorboard_dir), purge_step=step + 1)

    def write(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in _NOT_SCALARS and isinstance(value, (int, float)):
                    self.writer.add_scalar(scalar_tag(key), value, global_step=record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
