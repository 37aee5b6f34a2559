"""metrics.jsonl and its optional TensorBoard mirror (train.tensorboard)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config, tiny_tree
from nmtkit.cli import main
from nmtkit.metrics import MetricsLog, scalar_tag
from nmtkit.train import train


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under log_dir: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metric_names_map_to_train_and_valid_groups() -> None:
    assert scalar_tag("train_loss") == "train/loss"
    assert scalar_tag("valid_ppl") == "valid/ppl"
    assert scalar_tag("lr") == "train/lr"


def test_tensorboard_mirror_holds_every_number_of_every_record_at_its_step(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tmp_path / "tb")
    log.write(step=10, epoch=1, train_loss=5.5, lr=1e-3, tgt_tokens_per_s=1234.0)
    log.write(step=20, epoch=1, train_loss=4.25, lr=2e-3, tgt_tokens_per_s=1300.0)
    log.write(step=20, epoch=1, valid_loss=4.5, valid_acc=0.25)
    log.close()
    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(10, 5.5), (20, 4.25)]
    assert scalars["valid/loss"] == [(20, 4.5)]
    assert scalars["valid/acc"] == [(20, 0.25)]
    assert [step for step, _ in scalars["train/lr"]] == [10, 20]
    assert "train/epoch" not in scalars and "train/step" not in scalars
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # the JSON log is unchanged


def test_a_run_with_tensorboard_on_logs_the_losses_of_metrics_jsonl(corpus: dict, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    run = train(tiny_config(corpus, tmp_path / "run", train={"tensorboard": True}))
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(run.run_dir / "tensorboard")
    want_train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    want_valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    assert want_train and want_valid
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in want_train]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in want_train])
    assert [v for _, v in scalars["valid/loss"]] == pytest.approx([v for _, v in want_valid])


def test_tensorboard_on_without_the_package_exits_2_before_training(corpus: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    config = tmp_path / "tb.yaml"
    config.write_text(yaml.safe_dump(tiny_tree(corpus, tmp_path / "run", train={"tensorboard": True})))
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.tensorboard" in err and "pip install tensorboard" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training
