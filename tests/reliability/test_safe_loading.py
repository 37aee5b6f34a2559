"""Safe loading: a checkpoint is data, never code. Files that are malicious, from a newer nmtkit, incomplete,
truncated, or that don't match their own config are refused with a CheckpointError that says why."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_helpers import (
    one_torch_thread,  # noqa: F401 (autouse: tiny models train on one thread)
    run_main,
)

from conftest import BUNDLED, read_pairs
from nmtkit.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from nmtkit.config import TokenizerConfig
from nmtkit.tokenizer import train_tokenizer
from nmtkit.translator import Translator


class MakesADirectory:
    """Unpickling this calls os.makedirs(marker): harmless, and visible if it ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format_version": FORMAT_VERSION, "config": {}, "tokenizer": {}, "model": {}, "extra": MakesADirectory(marker)}, path)
    return path


def test_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path: Path) -> None:
    evil = malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    with pytest.raises(CheckpointError, match="weights_only") as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value)
    assert not (tmp_path / "pwned").exists()
    torch.load(evil, weights_only=False)  # the control: loaded unsafely, the file does run code
    assert (tmp_path / "pwned").is_dir()


def test_translate_with_a_malicious_checkpoint_exits_2_without_running_it(tmp_path: Path) -> None:
    evil = malicious_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    code, out, err = run_main(["translate", "--checkpoint", str(evil), "--device", "cpu", "hello"])
    assert code == 2
    assert "weights_only" in err and str(evil) in err and "Traceback" not in err
    assert not (tmp_path / "pwned").exists()


def test_checkpoint_from_a_newer_format_asks_for_an_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "future.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "config": {}, "tokenizer": {}, "model": {}}, path)
    with pytest.raises(CheckpointError, match=rf"format {FORMAT_VERSION + 1}, newer than this nmtkit reads \({FORMAT_VERSION}\); upgrade nmtkit"):
        load_checkpoint(path)


def test_checkpoint_without_config_tokenizer_and_model_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "partial.pt"
    torch.save({"format_version": FORMAT_VERSION, "tokenizer": {}}, path)
    with pytest.raises(CheckpointError, match=r"partial\.pt is missing config, model$"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [{"model": {}}, [1, 2], torch.zeros(3)], ids=["dict", "list", "tensor"])
def test_file_that_is_not_an_nmtkit_checkpoint_says_so(payload: object, tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="is not an nmtkit checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.5, 0.9, -1], ids=["empty", "first-bytes", "half", "most", "all-but-one-byte"])
def test_truncated_checkpoint_raises_checkpoint_error(keep: float, trained_run: Path, tmp_path: Path) -> None:
    whole = (trained_run / "checkpoints" / "best.pt").read_bytes()
    size = len(whole) - 1 if keep == -1 else int(len(whole) * keep)
    path = tmp_path / "truncated.pt"
    path.write_bytes(whole[:size])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["text-file", "bad-byte-in-a-pickled-key"])
def test_damaged_checkpoint_raises_checkpoint_error(damage: str, trained_run: Path, tmp_path: Path) -> None:
    data = bytearray((trained_run / "checkpoints" / "best.pt").read_bytes())
    if damage == "text-file":
        data = bytearray(b"hello world\n")  # torch.load reads it as a legacy pickle: KeyError
    else:
        data[data.index(b"format_version")] = 0xFF  # the key is no longer UTF-8: UnicodeDecodeError
    path = tmp_path / "damaged.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="damaged.pt"):
        load_checkpoint(path)


def test_flipped_byte_in_the_weights_is_detected(tmp_path: Path) -> None:
    from nmtkit.checkpoint import weights_digest

    path = tmp_path / "flipped.pt"
    weights = {"w": torch.full((1000,), 1.0)}
    torch.save({"format_version": FORMAT_VERSION, "config": {}, "tokenizer": {}, "model": weights, "model_sha256": weights_digest(weights)}, path)
    data = bytearray(path.read_bytes())
    data[data.index(torch.tensor(1.0).numpy().tobytes() * 4) + 1] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match="flipped.pt"):
        load_checkpoint(path)


def test_non_integer_format_version_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "odd.pt"
    torch.save({"format_version": "2", "config": {}, "tokenizer": {}, "model": {}}, path)
    with pytest.raises(CheckpointError, match="odd.pt"):
        load_checkpoint(path)


def resaved(trained_run: Path, path: Path, edit: Callable[[dict], object]) -> Path:
    """The run's best checkpoint with `edit` applied to its state, saved as `path`."""
    state = torch.load(trained_run / "checkpoints" / "best.pt", weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def test_checkpoint_whose_weights_do_not_fit_its_model_config_names_the_shapes(trained_run: Path, tmp_path: Path) -> None:
    path = resaved(trained_run, tmp_path / "wider.pt", lambda state: state["config"]["model"].update(d_model=64))
    with pytest.raises(CheckpointError, match=r"tgt_embed\.weight: checkpoint \(\d+, 32\) vs model \(\d+, 64\)") as info:
        Translator.from_checkpoint(path, device="cpu")
    assert str(path) in str(info.value)


def test_checkpoint_whose_weights_do_not_fit_its_tokenizer_names_the_shapes(trained_run: Path, tmp_path: Path) -> None:
    texts = [r["translation"]["en"] for r in read_pairs(BUNDLED / "train.jsonl", 200)]
    other = train_tokenizer(TokenizerConfig(vocab_size=300), texts, texts)
    edit = lambda state: state["tokenizer"].update(src=other.src_proto, tgt=other.tgt_proto)  # noqa: E731
    path = resaved(trained_run, tmp_path / "other-vocab.pt", edit)
    with pytest.raises(CheckpointError, match=rf"tgt_embed\.weight: checkpoint \(\d+, 32\) vs model \({other.tgt_vocab_size}, 32\)"):
        Translator.from_checkpoint(path, device="cpu")


def test_an_unreadable_last_pt_names_the_newest_other_save_and_how_to_resume_from_it(trained_run: Path, tmp_path: Path) -> None:
    """A damaged last.pt stops the resume; the message says which save is left and the command that resumes from it."""
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    good = (trained_run / "checkpoints" / "best.pt").read_bytes()
    for step in (2, 4):
        (directory / f"step-{step:06d}.pt").write_bytes(good)
    last = directory / "last.pt"
    last.write_bytes(good[: len(good) // 2])  # cut short: no zip archive's end
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(last)
    message = str(info.value)
    assert f"{last} is not a checkpoint: not a zip archive as torch.save writes" in message
    assert f"The newest other save is step-000004.pt: `ln -f {directory / 'step-000004.pt'} {last}` resumes from it" in message
    (directory / "text.pt").write_text("hello world\n", encoding="utf-8")  # torch.load took it for a legacy pickle
    with pytest.raises(CheckpointError, match=r"text\.pt is not a checkpoint: not a zip archive.*The newest other save is .*step-000004\.pt$"):
        load_checkpoint(directory / "text.pt")


def test_a_checkpoint_that_cannot_be_opened_is_named_as_unreadable_not_as_no_checkpoint(tmp_path: Path) -> None:
    """(Permissions or an I/O error; here a folder.) zipfile would take it for a file of another kind."""
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match=r"could not read checkpoint .*folder\.pt: Is a directory$"):
        load_checkpoint(folder)
