"""Bad input to a trained model: every sentence, however odd, gets a Translation that ends with </s>
within its length budget; a source longer than the model's positions is truncated with a warning."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
from reliability_helpers import one_torch_thread  # noqa: F401 (autouse: tiny models train on one thread)

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
}


@pytest.fixture(scope="module")
def translator(trained_run: Path) -> Translator:
    return Translator.from_checkpoint(trained_run, device="cpu")


def budget(translator: Translator, text: str) -> int:
    """decode.max_len_a * source length (with EOS) + max_len_b, capped by model.max_positions."""
    d, m = translator.cfg.decode, translator.cfg.model
    src_len = int((translator.encode_source([text]) != PAD_ID).sum())
    return min(m.max_positions, math.floor(d.max_len_a * src_len + d.max_len_b))


def assert_well_formed(result: Translation, text: str, translator: Translator) -> None:
    assert isinstance(result, Translation)
    assert result.source == text
    assert result.tokens and result.tokens[-1].id == EOS_ID
    assert len(result.tokens) <= budget(translator, text)
    assert all(0.0 <= step.prob <= 1.0 and math.isfinite(step.loss) for step in result.tokens)


@pytest.mark.parametrize("name", INPUTS)
def test_odd_input_gets_a_translation_that_ends_with_eos_within_its_budget(name: str, translator: Translator) -> None:
    (result,) = translator.translate([INPUTS[name]])
    assert_well_formed(result, INPUTS[name], translator)


def test_odd_inputs_in_one_batch_each_get_a_well_formed_translation(translator: Translator) -> None:
    texts = list(INPUTS.values())
    results = translator.translate(texts)
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        assert_well_formed(result, text, translator)


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
