"""The run directory's tokenizer: trained from the config's training data by the run's first start (or `nmtkit
tokenizer`), reused by every later one, and refused when the config asks for another.

`RUN_DIR/tokenizer/trained_from.json` records the settings and data the tokenizer was trained from; a tokenizer put
there by hand has no record and is used as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets

from .checkpoint import checkpoint_dir, same_path
from .config import Config, ConfigError
from .data import iter_texts, sample_rows
from .tokenizer import Tokenizer, train_tokenizer
from .whole_file import write_whole

log = logging.getLogger(__name__)


# What a tokenizer trained by nmtkit was trained from, written beside its models: the tokenizer section (but
# max_sentences, a sampling cap) and the data keys that choose the training text.
_TRAINED_FROM = "trained_from.json"
_TOKENIZER_DATA_KEYS = ("train", "src_lang", "tgt_lang", "hub_name", "hub_config")


def tokenizer_sources(cfg: Config) -> dict[str, Any]:
    settings = {f"tokenizer.{k}": v for k, v in asdict(cfg.tokenizer).items() if k != "max_sentences"}
    data = {f"data.{k}": getattr(cfg.data, k) for k in _TOKENIZER_DATA_KEYS}
    data["data.train"] = os.path.normpath(data["data.train"])  # ./data/x and data/x are one file
    return settings | data


def prepare_tokenizer(cfg: Config, run_dir: Path, train_raw: datasets.Dataset, given: Tokenizer | None = None) -> Tokenizer:
    """Reuse the run directory's tokenizer when present, otherwise train one from the training split; or, with
    `given` (the tokenizer of `train.init_from`'s checkpoint), use that one.

    A reused tokenizer that nmtkit trained must come from the config's settings and training data: one left by an
    earlier attempt with other settings would otherwise be used silently (a tokenizer put there by hand has no record
    and is used as it is)."""
    directory = run_dir / "tokenizer"
    if given is not None:
        if Tokenizer.exists(directory) and Tokenizer.load(directory).fingerprint != given.fingerprint:
            raise ConfigError([
                f"train.init_from: {directory} holds another tokenizer than the checkpoint's, whose pieces its weights"
                f" are trained on; use a new train.run_dir, or delete {directory}"
            ])
        if not Tokenizer.exists(directory):
            given.save(directory)
            _write_record(directory, {"train.init_from": cfg.train.init_from})  # not the config's tokenizer section
        log.info("tokenizer: the checkpoint's of train.init_from (%d/%d pieces) -> %s", given.src_vocab_size, given.tgt_vocab_size, directory)
        return given
    if Tokenizer.exists(directory):
        record = directory / _TRAINED_FROM
        if record.is_file():
            try:
                old = json.loads(record.read_text(encoding="utf-8"))
            except ValueError:
                old = None
            if not isinstance(old, dict):
                raise ConfigError([f"{record}: not a JSON object of settings; delete it to use the tokenizer as it is"])
            if "train.init_from" in old and not (checkpoint_dir(run_dir) / "last.pt").is_file():
                raise ConfigError([
                    f"{directory} is the tokenizer of train.init_from {old['train.init_from']!r}, and no checkpoint of"
                    f" this run uses it yet; set train.init_from again to fine-tune, or delete {directory} to train"
                    " from scratch with a tokenizer of the config's"
                ])
            now = tokenizer_sources(cfg)
            diffs = [f"{k}: tokenizer trained with {old.get(k)!r}, config has {v!r}" for k, v in now.items() if not _same(k, old.get(k, v), v)]
            if diffs:
                raise ConfigError(
                    diffs, f"{directory} (restore these settings, use a new train.run_dir, delete {record.name} to use"
                    f" this tokenizer as it is, or, if no checkpoint in {run_dir} uses it, delete {directory} to train a new one)"
                )
        log.info("tokenizer: reusing %s", directory)
        return Tokenizer.load(directory)
    t0 = time.time()
    # tokenizer.max_sentences caps what each SentencePiece model reads (a joint one reads both sides), so a
    # large corpus gives a random sample of pairs, streamed from Arrow: SentencePiece keeps its input in memory.
    max_pairs = math.ceil(cfg.tokenizer.max_sentences / (2 if cfg.tokenizer.joint else 1))
    rows = sample_rows(len(train_raw), max_pairs, cfg.train.seed)
    if rows is not None:
        log.info("tokenizer: training on %s random pairs of %s (tokenizer.max_sentences=%s)", f"{max_pairs:,}", f"{len(train_raw):,}", f"{cfg.tokenizer.max_sentences:,}")
    tok = train_tokenizer(cfg.tokenizer, iter_texts(train_raw, "src", rows), iter_texts(train_raw, "tgt", rows))
    tok.save(directory)
    _write_record(directory, tokenizer_sources(cfg))
    kind = "joint" if tok.is_joint else "separate"
    log.info("tokenizer: trained %s %s vocabulary (%d pieces) in %.1fs -> %s", kind, cfg.tokenizer.type, tok.tgt_vocab_size, time.time() - t0, directory)
    return tok


def _same(key: str, old: Any, new: Any) -> bool:
    """One recorded setting against the config's: equal, or for data.train the same file spelled another way
    (relative against absolute, through a link)."""
    return old == new or (key == "data.train" and same_path(old, new))


def _write_record(directory: Path, sources: dict[str, Any]) -> None:
    write_whole(directory / _TRAINED_FROM, json.dumps(sources, indent=1) + "\n")  # a crash never leaves half a record
