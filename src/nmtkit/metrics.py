"""The run's metrics: `metrics.jsonl` always, mirrored to TensorBoard when `train.tensorboard` is on.

metrics.jsonl holds one JSON object per log line or validation pass (what `nmtkit plot` reads), and a
`{"step": N, "resumed": true}` mark where a resumed run goes on from its checkpoint at step N. With
TensorBoard, every number of a record becomes a scalar at the record's step: `train_loss` is logged as
`train/loss`, `valid_ppl` as `valid/ppl`, and anything else (`lr`, `tgt_tokens_per_s`, ...) under `train/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_NOT_SCALARS = {"step", "epoch", "resumed"}


class TensorBoardMissingError(RuntimeError):
    """train.tensorboard is on but the tensorboard package is not installed."""


def open_tensorboard(log_dir: Path) -> Any:
    """A SummaryWriter for `log_dir`, or a clear error naming the setting and the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch raises ImportError itself when the tensorboard package is absent
        raise TensorBoardMissingError(
            "train.tensorboard is true but the tensorboard package is not installed; "
            "run `pip install tensorboard` (in a clone of nmtkit: `pip install -e '.[tensorboard]'`), or set train.tensorboard: false"
        ) from e
    return SummaryWriter(log_dir=str(log_dir))


def scalar_tag(key: str) -> str:
    """`train_loss` -> `train/loss`, `valid_acc` -> `valid/acc`, `lr` -> `train/lr`."""
    for group in ("train", "valid"):
        if key.startswith(group + "_"):
            return f"{group}/{key[len(group) + 1 :]}"
    return f"train/{key}"


class MetricsLog:
    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.writer = open_tensorboard(tensorboard_dir) if tensorboard_dir is not None else None

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
