"""`nmtkit tokenizer`: train (or reuse) a config's tokenizer and describe what it does to the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import Config
from .data import load_split
from .init_from import init_checkpoint
from .run_tokenizer import prepare_tokenizer
from .translator import tokenizer_from_state


def tokenizer_command(cfg: Config) -> str:
    run_dir = Path(cfg.train.run_dir)
    cache_dir = Path(cfg.data.cache_dir or run_dir / "cache")
    train_raw = load_split(cfg.data, "train", cache_dir)
    init = init_checkpoint(cfg, run_dir)  # with train.init_from, the vocabulary training will use is that checkpoint's
    tok = prepare_tokenizer(cfg, run_dir, train_raw, tokenizer_from_state(init[1]) if init else None)
    sample = train_raw.select(range(min(2000, len(train_raw))))
    src_lens = np.array([len(x) for x in tok.encode_src(list(sample["src"]))])
    tgt_lens = np.array([len(x) for x in tok.encode_tgt(list(sample["tgt"]))])
    first_src, first_tgt = sample[0]["src"], sample[0]["tgt"]
    lines = [
        f"tokenizer: {run_dir / 'tokenizer'} ({'joint' if tok.is_joint else 'separate'} {cfg.tokenizer.type})",
        f"vocabulary: source {tok.src_vocab_size}, target {tok.tgt_vocab_size}; pad 0, unk 1, bos 2, eos 3",
        f"pieces per sentence (first {len(sample)} training pairs): "
        f"{cfg.data.src_lang} mean {src_lens.mean():.1f} / max {src_lens.max()}, {cfg.data.tgt_lang} mean {tgt_lens.mean():.1f} / max {tgt_lens.max()}",
        f"example: {first_src!r} -> {tok.src.encode(first_src, out_type=str)}",
        f"         {first_tgt!r} -> {tok.tgt.encode(first_tgt, out_type=str)}",
    ]
    return "\n".join(lines)
