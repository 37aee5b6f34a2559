"""`nmtkit average`: the averaged checkpoint holds the elementwise mean of the newest N saves' weights, loads like any
checkpoint (Translator, `nmtkit evaluate`), and asking for more saves than exist, or for saves that don't fit
together, is a clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nmtkit.average import average_checkpoints, newest_checkpoints
from nmtkit.checkpoint import CheckpointError, load_checkpoint, weights_digest, write_atomic
from nmtkit.cli import main
from nmtkit.translator import Translator


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """The trained run's checkpoints (step-000006.pt and step-000012.pt) in a directory this test may write to."""
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    return run


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_averaging_two_checkpoints_gives_the_elementwise_mean(run_copy: Path, capsys) -> None:
    assert main(["average", str(run_copy), "--last", "2"]) == 0
    averaged = run_copy / "checkpoints" / "averaged.pt"
    assert "averaged steps 6, 12" in capsys.readouterr().out
    a, b, mean = (
        weights(run_copy / "checkpoints" / "step-000006.pt"),
        weights(run_copy / "checkpoints" / "step-000012.pt"),
        weights(averaged),
    )
    assert set(mean) == set(a)
    for name in a:
        torch.testing.assert_close(mean[name], (a[name] + b[name]) / 2)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the two saves really differ
    state = load_checkpoint(averaged)
    assert state["averaged_steps"] == [6, 12] and state["step"] == 12
    assert state["config"] == load_checkpoint(run_copy / "checkpoints" / "step-000012.pt")["config"]


def test_averaging_one_checkpoint_keeps_its_weights(run_copy: Path, tmp_path: Path) -> None:
    result = average_checkpoints(run_copy, last=1, out=tmp_path / "one.pt")
    assert result.path == tmp_path / "one.pt" and result.steps == [12]
    newest = weights(run_copy / "checkpoints" / "step-000012.pt")
    for name, tensor in weights(result.path).items():
        assert torch.equal(tensor, newest[name])


def test_averaged_checkpoint_translates_and_evaluates(run_copy: Path, trained_run: Path, capsys) -> None:
    path = average_checkpoints(run_copy, last=2).path
    (result,) = Translator.from_checkpoint(path, "cpu").translate(["Hello."])
    assert result.tokens and result.tokens[-1].piece == "</s>"
    assert main(["evaluate", "--checkpoint", str(path), "--json", "--no-bleu", "--limit", "5"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["sentences"] == 5 and m["checkpoint"] == str(path)


def test_asking_for_more_checkpoints_than_exist_names_how_many_there_are(run_copy: Path, capsys) -> None:
    assert main(["average", str(run_copy), "--last", "5"]) == 2
    err = capsys.readouterr().err
    assert "last 5" in err and "only 2" in err and "step-000006.pt, step-000012.pt" in err and "Traceback" not in err
    assert not (run_copy / "checkpoints" / "averaged.pt").exists()


def test_newest_checkpoints_go_by_step_number_not_file_age(run_copy: Path) -> None:
    directory = run_copy / "checkpoints"
    shutil.copy(directory / "step-000006.pt", directory / "step-000100.pt")  # newest step, whatever its content
    assert [step for step, _ in newest_checkpoints(run_copy, 2)] == [12, 100]


def test_step_files_beyond_a_million_steps_sort_and_rotate_by_number(tmp_path: Path) -> None:
    """step-%06d names stop sorting as text at step 1,000,000: rotation must still delete the oldest saves."""
    from nmtkit.checkpoint import _rotate, step_files

    for step in (999_998, 999_999, 1_000_000, 1_000_001):
        (tmp_path / f"step-{step:06d}.pt").write_bytes(b"")
    assert [step for step, _ in step_files(tmp_path)] == [999_998, 999_999, 1_000_000, 1_000_001]
    _rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1000000.pt", "step-1000001.pt"]


def test_checkpoints_of_different_models_are_refused_naming_the_difference(run_copy: Path) -> None:
    state = load_checkpoint(run_copy / "checkpoints" / "step-000012.pt")
    state["config"]["model"]["d_ff"] = 128
    state["model"]["decoder.0.ffn.up.weight"] = torch.zeros(128, 32)
    state["model_sha256"] = weights_digest(state["model"])  # a consistent file, just of another model
    write_atomic(state, run_copy / "checkpoints" / "step-000018.pt")
    with pytest.raises(CheckpointError) as info:
        average_checkpoints(run_copy, last=2)
    message = str(info.value)
    assert "model.d_ff: step-000012.pt 64, step-000018.pt 128" in message
    assert "decoder.0.ffn.up.weight: shape (64, 32) vs (128, 32)" in message


def test_saves_of_a_run_resumed_with_another_test_split_average_like_any_others(run_copy: Path) -> None:
    """What resuming accepts (settings the weights don't depend on), averaging accepts too."""
    state = load_checkpoint(run_copy / "checkpoints" / "step-000012.pt")
    state["config"]["data"]["test"] = "elsewhere/test.jsonl"
    write_atomic(state, run_copy / "checkpoints" / "step-000018.pt")
    assert average_checkpoints(run_copy, last=2).steps == [12, 18]


def test_average_without_last_takes_every_kept_save_up_to_five(run_copy: Path, capsys) -> None:
    """The run kept two saves (train.keep_checkpoints defaults to 3): the default averages both, no error."""
    assert main(["average", str(run_copy)]) == 0
    assert "averaged steps 6, 12" in capsys.readouterr().out


def test_a_run_without_checkpoints_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoints directory"):
        average_checkpoints(tmp_path, last=1)
