"""Bad input to a trained model: every sentence, however odd, gets a Translation that ends with </s>
within its length budget; a source longer than the model's positions is truncated with a warning."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import one_torch_thread, run_main, subprocess_env  # noqa: F401 (autouse: tiny models train on one thread)

from nmtkit import translator as translator_module
from nmtkit.records import Translation
from nmtkit.tokenizer import EOS_ID, PAD_ID
from nmtkit.translator import Translator

INPUTS = {
    "empty": "",
    "whitespace": " \t \u3000 ",
    "newlines": "\n\r\n",
    "emoji": "🙂🚀👩‍👩‍👧 ok 🇨🇳",
    "control-characters": "\x00\x01\x07\x1b[31mred\x1b[0m\x7f\u200b\ufeff",
    "5000-words": " ".join(["repeat"] * 5000),
    "mixed-scripts": "Hello 你好 Привет مرحبا שלום नमस्ते こんにちは 안녕",
    "unpaired-surrogate": "bad \ud800 half",
    "private-use-and-unassigned": "\ue000\U0010fffd\U000e0001",
    "control-characters-only": "\x00\x07\x1b\x7f",
}
# nothing to translate: a blank translation with no tokens, so the output stays line-aligned with the input
BLANK = {"empty", "whitespace", "newlines", "control-characters-only"}


@pytest.fixture(scope="module")
def translator(trained_run: Path) -> Translator:
    return Translator.from_checkpoint(trained_run, device="cpu")


def budget(translator: Translator, text: str) -> int:
    """decode.max_len_a * source length (with EOS) + max_len_b, capped by model.max_positions."""
    d, m = translator.cfg.decode, translator.cfg.model
    src_len = int((translator.encode_source([text]) != PAD_ID).sum())
    return min(m.max_positions, math.floor(d.max_len_a * src_len + d.max_len_b))


def assert_well_formed(result: Translation, name: str, translator: Translator) -> None:
    text = INPUTS[name]
    assert isinstance(result, Translation)
    assert result.source == text
    if name in BLANK:
        assert (result.translation, result.tokens, result.truncated) == ("", [], False)
        return
    assert result.tokens and result.tokens[-1].id == EOS_ID
    assert len(result.tokens) <= budget(translator, text)
    assert all(0.0 <= step.prob <= 1.0 and math.isfinite(step.loss) for step in result.tokens)


@pytest.mark.parametrize("name", INPUTS)
def test_odd_input_gets_a_translation_that_ends_with_eos_within_its_budget_or_a_blank_one(name: str, translator: Translator) -> None:
    (result,) = translator.translate([INPUTS[name]])
    assert_well_formed(result, name, translator)


def test_odd_inputs_in_one_batch_each_get_a_well_formed_translation(translator: Translator) -> None:
    results = translator.translate(list(INPUTS.values()))
    assert len(results) == len(INPUTS)
    for name, result in zip(INPUTS, results):
        assert_well_formed(result, name, translator)


def test_source_longer_than_max_positions_is_truncated_with_a_warning(translator: Translator, caplog: pytest.LogCaptureFixture) -> None:
    text = INPUTS["5000-words"]
    with caplog.at_level(logging.WARNING, logger="nmtkit"):
        src = translator.encode_source([text])
    assert src.shape[1] == translator.cfg.model.max_positions  # truncated pieces + EOS
    assert "source truncated" in caplog.text and "model.max_positions" in caplog.text
    assert len(translator.translate([text])[0].tokens) <= translator.cfg.model.max_positions


def test_inference_keeps_format_characters_as_training_does_and_drops_control_characters(translator: Translator) -> None:
    """The zero-width non-joiner is part of Persian spelling: the source is encoded with it, as training data is (here
    between known pieces, since a run of characters outside the vocabulary becomes one unknown piece either way)."""
    def ids(text: str) -> list[int]:
        row = translator.encode_source([text])[0]
        return row[row != PAD_ID].tolist()

    joined = "I like\u200c cats."
    assert ids(joined) == translator.tokenizer.encode_src([joined])[0] + [EOS_ID] != ids("I like cats.")
    assert ids("I like\x07 cats.\x1b") == ids("I like cats.")


def test_a_reference_longer_than_max_positions_is_truncated_with_a_warning(translator: Translator, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nmtkit"):
        tgt_in, _ = translator.encode_target([INPUTS["5000-words"]])
    assert tgt_in.shape[1] == translator.cfg.model.max_positions  # BOS + the truncated pieces
    assert "reference truncated" in caplog.text and "model.max_positions" in caplog.text


# ----------------------------------------------------------------------------- the command line's input and output


def translate_cli(trained_run: Path, *argv: str, stdin: bytes | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    return run_main(["translate", "--checkpoint", str(trained_run), "--device", "cpu", *argv])


def test_input_that_is_not_utf8_exits_2_whether_from_stdin_a_file_or_the_command_line(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    code, out, err = translate_cli(trained_run, "--format", "jsonl", stdin=b"Hello.\nbad \xff byte\n", monkeypatch=monkeypatch)
    assert code == 2 and "error: stdin, line 2 is not UTF-8 text (byte 4 of the line)" in err and out == ""
    (tmp_path / "in.txt").write_bytes(b"bad \xff byte\n")
    code, _, err = translate_cli(trained_run, "-i", str(tmp_path / "in.txt"))
    assert code == 2 and f"--input: {tmp_path / 'in.txt'}, line 1 is not UTF-8 text (byte 4 of the line)" in err
    (tmp_path / "in.txt").write_bytes(b"\xef\xbb\xbfbad \xff byte\n")  # the byte order mark's three bytes count too
    code, _, err = translate_cli(trained_run, "-i", str(tmp_path / "in.txt"))
    assert code == 2 and f"--input: {tmp_path / 'in.txt'}, line 1 is not UTF-8 text (byte 7 of the line)" in err
    code, _, err = translate_cli(trained_run, "caf\udce9 ok")  # how Python hands over an argument's bad byte
    assert code == 2 and "sentence 1 on the command line is not UTF-8 text" in err and "Traceback" not in err


def test_a_byte_order_mark_is_not_part_of_the_first_sentence_or_reference(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    for name, text in (("plain", "Hello.\r\nThank you.\n"), ("bom", "\ufeffHello.\r\nThank you.\n")):
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8", newline="")
        (tmp_path / f"{name}.ref").write_text(text.replace("Hello.", "你好。").replace("Thank you.", "谢谢。"), encoding="utf-8", newline="")
    records = {}
    for name in ("plain", "bom"):
        code, out, err = translate_cli(trained_run, "-i", str(tmp_path / f"{name}.txt"), "--references", str(tmp_path / f"{name}.ref"), "--format", "jsonl")
        assert code == 0, err
        records[name] = [json.loads(line) for line in out.splitlines()]
    assert records["bom"] == records["plain"] and records["bom"][0]["source"] == "Hello."
    code, out, _ = translate_cli(trained_run, "--format", "jsonl", stdin="\ufeffHello.\n".encode(), monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out)["source"] == "Hello."


def test_conflicting_or_unusable_input_and_output_paths_exit_2_before_loading_the_model(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded the model before checking the input")

    monkeypatch.setattr(translator_module.Translator, "from_checkpoint", no_loading)
    (tmp_path / "in.txt").write_text("Hello.\n", encoding="utf-8")
    (tmp_path / "two.txt").write_text("你好。\n谢谢。\n", encoding="utf-8")
    cases = {
        ("-i", str(tmp_path / "in.txt"), "--references", str(tmp_path / "two.txt")): "2 references for 1 sentences",
        ("Hello.", "-i", str(tmp_path / "in.txt")): "sentences on the command line and --input: give one or the other",
        ("Hello.", "-r", "你好。", "--references", str(tmp_path / "in.txt")): "--reference and --references: give one or the other",
        ("-i", str(tmp_path)): f"--input: cannot read {tmp_path}",
        ("Hello.", "--html", str(tmp_path / "in.txt" / "page.html")): f"{tmp_path / 'in.txt'} is not a folder",
        ("Hello.", "--html", str(tmp_path)): f"--html: {tmp_path} is a folder",
    }
    for argv, message in cases.items():
        code, out, err = translate_cli(trained_run, *argv)
        assert code == 2 and message in err and "Traceback" not in err, (argv, err)


def test_a_length_penalty_that_is_not_finite_is_refused(trained_run: Path, capsys) -> None:
    from nmtkit.cli import main

    for value in ("nan", "inf"):
        with pytest.raises(SystemExit) as info:
            main(["translate", "--checkpoint", str(trained_run), "--beam", "3", "--length-penalty", value, "Hello."])
        assert info.value.code == 2 and f"expected a finite number, got '{value}'" in capsys.readouterr().err


def test_a_reader_that_stops_early_ends_the_command_quietly(trained_run: Path, tmp_path: Path) -> None:
    """`nmtkit translate ... | head -1`: the closed pipe stops it with the status a signal would give, no traceback."""
    (tmp_path / "in.txt").write_text("I like cats.\n" * 300, encoding="utf-8")
    command = [sys.executable, "-m", "nmtkit", "translate", "--checkpoint", str(trained_run), "--device", "cpu", "--show-tokens", "-i", str(tmp_path / "in.txt")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    assert proc.stdout is not None and proc.stdout.readline()
    proc.stdout.close()  # the reader goes away after one line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()[-2000:]


def test_stdin_lines_are_translated_as_they_arrive(trained_run: Path) -> None:
    """A pipe or terminal gets each line's translation before the next line is written (fairseq-interactive's and
    Marian's behaviour), and input that is all there at once still comes out whole and in order."""
    command = [sys.executable, "-m", "nmtkit", "translate", "--checkpoint", str(trained_run), "--device", "cpu", "--format", "jsonl"]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        for sentence in ("Hello.", "I like cats."):
            proc.stdin.write(f"{sentence}\n".encode())
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 60)  # never hang: nothing in a minute is a failure
            assert ready, f"no translation of {sentence!r} while stdin stays open"
            assert json.loads(proc.stdout.readline())["source"] == sentence
        proc.stdin.write(b"Thank you.\nGood night.\n")
        proc.stdin.close()
        assert [json.loads(line)["source"] for line in proc.stdout] == ["Thank you.", "Good night."]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:  # a failed assertion above: no process left behind
            proc.kill()
            proc.wait(timeout=60)


def test_stdin_from_a_file_or_a_pipe_gives_every_line_once_in_order(tmp_path: Path, monkeypatch) -> None:
    from nmtkit.text_input import stdin_chunks

    text = "\ufeffone\r\ntwo\nthree \u4e09\nfour\nfive"  # a byte order mark, CRLF, no final line feed
    (tmp_path / "in.txt").write_text(text, encoding="utf-8", newline="")
    with open(tmp_path / "in.txt", encoding="utf-8") as f:  # `< FILE`: read whole, cut like a file
        monkeypatch.setattr(sys, "stdin", f)
        assert list(stdin_chunks(2)) == [["one", "two"], ["three 三", "four"], ["five"]]
    read_end, write_end = os.pipe()
    os.write(write_end, text.encode())
    os.close(write_end)
    with open(read_end, encoding="utf-8") as pipe:  # a pipe: chunks of what has arrived, at most 2 lines each
        monkeypatch.setattr(sys, "stdin", pipe)
        chunks = list(stdin_chunks(2))
    assert [line for chunk in chunks for line in chunk] == ["one", "two", "three 三", "four", "five"]
    assert all(1 <= len(chunk) <= 2 for chunk in chunks)


def test_a_stream_translates_the_lines_before_a_bad_one_and_closed_stdin_is_no_input(tmp_path: Path, monkeypatch) -> None:
    from nmtkit.config import ConfigError
    from nmtkit.text_input import stdin_chunks

    read_end, write_end = os.pipe()
    os.write(write_end, b"one\ntwo\nbad \xff\nfour\n")
    os.close(write_end)
    got = []
    with open(read_end, encoding="utf-8") as pipe:
        monkeypatch.setattr(sys, "stdin", pipe)
        with pytest.raises(ConfigError, match=r"^stdin, line 3 is not UTF-8 text"):
            for chunk in stdin_chunks(10):
                got += chunk
    assert got == ["one", "two"]
    monkeypatch.setattr(sys, "stdin", None)  # started with stdin closed
    assert list(stdin_chunks(10)) == []


def test_references_on_stdin_with_the_sentences_on_stdin_are_refused(trained_run: Path) -> None:
    code, _, err = run_main(["translate", "--checkpoint", str(trained_run), "--references", "-"])
    assert code == 2 and "stdin can't hold both the sentences and their references" in err
