"""SentencePiece tokenizers: fixed special ids, round trips in English and Chinese, joint and
separate vocabularies, and reuse instead of retraining."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BUNDLED, read_pairs
from nmtkit.config import TokenizerConfig
from nmtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, TokenizerError, train_tokenizer


@pytest.fixture(scope="module")
def texts() -> tuple[list[str], list[str]]:
    rows = read_pairs(BUNDLED / "train.jsonl", 3000)
    return [r["translation"]["en"] for r in rows], [r["translation"]["zh"] for r in rows]


@pytest.fixture(scope="module")
def joint(texts) -> Tokenizer:
    return train_tokenizer(TokenizerConfig(vocab_size=2500), *texts)


def test_special_ids_are_fixed(joint: Tokenizer) -> None:
    sp = joint.src
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


@pytest.mark.parametrize("text", ["Tell me something about yourself.", "I'd like to go with Tom.", "告诉我关于你的事情。", "我们聊了一会儿。"])
def test_round_trip_in_english_and_chinese(joint: Tokenizer, text: str) -> None:
    ids = joint.encode_tgt([text])[0]
    assert all(i > EOS_ID for i in ids)
    assert joint.decode_tgt(ids) == text


def test_decode_stops_at_eos_and_skips_bos_and_padding(joint: Tokenizer) -> None:
    ids = joint.encode_tgt(["你好。"])[0]
    assert joint.decode_tgt([BOS_ID, *ids, EOS_ID, *joint.encode_tgt(["再见"])[0], PAD_ID]) == "你好。"


def test_joint_vocabulary_is_shared(joint: Tokenizer) -> None:
    assert joint.is_joint and joint.src is joint.tgt and joint.src_vocab_size == joint.tgt_vocab_size == 2500


def test_separate_vocabularies_have_their_own_sizes(texts) -> None:
    tok = train_tokenizer(TokenizerConfig(joint=False, vocab_size=2500, src_vocab_size=500), *texts)
    assert not tok.is_joint
    assert (tok.src_vocab_size, tok.tgt_vocab_size) == (500, 2500)
    assert tok.decode_tgt(tok.encode_tgt(["我们聊了一会儿。"])[0]) == "我们聊了一会儿。"


def test_bpe_model_type_trains(texts) -> None:
    tok = train_tokenizer(TokenizerConfig(type="bpe", vocab_size=2500), *texts)
    assert tok.decode_tgt(tok.encode_tgt(["Do you have a garage?"])[0]) == "Do you have a garage?"


def test_saved_tokenizer_loads_back_identically(joint: Tokenizer, tmp_path: Path) -> None:
    joint.save(tmp_path)
    assert Tokenizer.exists(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == joint.fingerprint
    assert again.encode_src(["Hello there."]) == joint.encode_src(["Hello there."])


def test_loading_from_an_empty_directory_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="spm.model"):
        Tokenizer.load(tmp_path)


def test_a_file_that_is_not_a_sentencepiece_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "spm.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path)


def test_vocabulary_smaller_than_the_character_set_names_the_keys_to_change(texts) -> None:
    with pytest.raises(TokenizerError, match="tokenizer.vocab_size=100.*character_coverage"):
        train_tokenizer(TokenizerConfig(vocab_size=100), *texts)


def test_a_source_vocabulary_too_small_names_src_vocab_size(texts) -> None:
    """Separate vocabularies with Chinese as the source: the source model's own size is the one to raise."""
    en, zh = texts
    with pytest.raises(TokenizerError, match=r"\(tokenizer\.src_vocab_size=500,.*raise tokenizer\.src_vocab_size or"):
        train_tokenizer(TokenizerConfig(joint=False, vocab_size=2000, src_vocab_size=500), zh, en)


def test_small_corpus_gets_a_smaller_vocabulary_instead_of_an_error() -> None:
    tok = train_tokenizer(TokenizerConfig(vocab_size=5000), ["a b c", "abc cab"], ["a", "b"])
    assert 4 < tok.tgt_vocab_size < 5000
