"""SentencePiece tokenizers: one joint model, or one per side, with fixed special ids.

The models are trained from the training split as the config says, saved into the run directory,
reused when present, and also carried inside every checkpoint (as serialized bytes), so a
checkpoint alone is enough to translate.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from .config import TokenizerConfig
from .whole_file import write_whole

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or does not match what the run expects."""


def _processor(proto: bytes, what: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError
        raise TokenizerError(f"{what}: not a SentencePiece model ({e})") from None
    got = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    if got != SPECIAL_IDS:
        raise TokenizerError(f"{what}: special ids {got} differ from nmtkit's fixed ids {SPECIAL_IDS}")
    return sp


class Tokenizer:
    """Source and target SentencePiece models (the same object when the vocabulary is joint)."""

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None) -> None:
        self.src_proto = src_proto
        self.tgt_proto = tgt_proto  # None = joint vocabulary
        self.src = _processor(src_proto, "source tokenizer")
        self.tgt = self.src if tgt_proto is None else _processor(tgt_proto, "target tokenizer")
        digest = hashlib.sha256(src_proto + (tgt_proto or b"")).hexdigest()
        self.fingerprint = digest[:16]

    @property
    def is_joint(self) -> bool:
        return self.tgt_proto is None

    @property
    def src_vocab_size(self) -> int:
        return self.src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt.get_piece_size()

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        """Piece ids without BOS/EOS (the batching code adds them)."""
        return self.src.encode(texts)

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        return self.tgt.encode(texts)

    def decode_tgt(self, ids: list[int]) -> str:
        """Text of target ids, stopping at the first EOS and skipping other special ids."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(i)
        return self.tgt.decode(out)

    def tgt_piece(self, i: int) -> str:
        return self.tgt.id_to_piece(int(i))

    def src_piece(self, i: int) -> str:
        return self.src.id_to_piece(int(i))

    # -- files ------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # each file renamed into place whole: an interrupted save must not leave a model that `exists` accepts
        if self.is_joint:
            write_whole(directory / "spm.model", self.src_proto)
        else:
            write_whole(directory / "spm.tgt.model", self.tgt_proto or b"")
            write_whole(directory / "spm.src.model", self.src_proto)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        if (directory / "spm.model").is_file():
            return cls((directory / "spm.model").read_bytes())
        src, tgt = directory / "spm.src.model", directory / "spm.tgt.model"
        if src.is_file() and tgt.is_file():
            return cls(src.read_bytes(), tgt.read_bytes())
        raise TokenizerError(
            f"no tokenizer in {directory}: expected spm.model (joint) or spm.src.model + spm.tgt.model;"
            " run `nmtkit tokenizer --config ...` or `nmtkit train`, which trains one"
        )

    @staticmethod
    def exists(directory: str | Path) -> bool:
        d = Path(directory)
        return (d / "spm.model").is_file() or ((d / "spm.src.model").is_file() and (d / "spm.tgt.model").is_file())


def _train_one(sentences: Iterable[str], cfg: TokenizerConfig, vocab_size: int, key: str = "tokenizer.vocab_size") -> bytes:
    """One SentencePiece model of `vocab_size` pieces; `key` is the setting that size came from, for the errors."""
    model = io.BytesIO()
    try:
        _run_trainer(sentences, cfg, vocab_size, model)
    except RuntimeError as e:
        if "KeyboardInterrupt" in str(e):  # Ctrl-C while SentencePiece read its input (from a Python iterator)
            raise KeyboardInterrupt from None
        detail = str(e).split("]", 1)[-1].strip()
        raise TokenizerError(
            f"SentencePiece training failed: {detail} ({key}={vocab_size}, "
            f"tokenizer.character_coverage={cfg.character_coverage}); raise {key} or lower "
            "tokenizer.character_coverage"
        ) from None
    return model.getvalue()


def _run_trainer(sentences: Iterable[str], cfg: TokenizerConfig, vocab_size: int, model: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_nonempty(sentences),
        model_writer=model,
        model_type=cfg.type,
        vocab_size=vocab_size,
        character_coverage=cfg.character_coverage,
        normalization_rule_name=cfg.normalization,
        # Every sentence given is used: the caller applies tokenizer.max_sentences by sampling pairs (see
        # run_tokenizer.prepare_tokenizer). SentencePiece's own cap would still pull every sentence of a large corpus
        # through Python, and setting it changes the model even when the corpus is below the cap.
        input_sentence_size=0,
        shuffle_input_sentence=False,  # its default (True) reorders the input, which changes the model
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        minloglevel=2,
        num_threads=2,
    )


def _nonempty(sentences: Iterable[str]) -> Iterator[str]:
    for s in sentences:
        if s and s.strip():
            yield s


def train_tokenizer(cfg: TokenizerConfig, src_texts: Iterable[str], tgt_texts: Iterable[str]) -> Tokenizer:
    """Train a joint model on both sides, or one model per side when `cfg.joint` is False.

    Every text given is used; `cfg.max_sentences` is the caller's to apply (`run_tokenizer.prepare_tokenizer` samples).
    """
    if cfg.joint:
        both = _chain(src_texts, tgt_texts)
        tok = Tokenizer(_train_one(both, cfg, cfg.vocab_size))
    else:
        src_key = "tokenizer.src_vocab_size" if cfg.src_vocab_size else "tokenizer.vocab_size"
        src_size = cfg.src_vocab_size or cfg.vocab_size
        tok = Tokenizer(_train_one(src_texts, cfg, src_size, src_key), _train_one(tgt_texts, cfg, cfg.vocab_size))
        if tok.src_vocab_size < src_size:
            log.warning("tokenizer: the source corpus supports only %d pieces (asked for %s=%d)", tok.src_vocab_size, src_key, src_size)
    if tok.tgt_vocab_size < cfg.vocab_size:
        side = "" if cfg.joint else "target "
        log.warning("tokenizer: the %scorpus supports only %d pieces (asked for tokenizer.vocab_size=%d)", side, tok.tgt_vocab_size, cfg.vocab_size)
    return tok


def _chain(a: Iterable[str], b: Iterable[str]) -> Iterator[str]:
    yield from a
    yield from b
