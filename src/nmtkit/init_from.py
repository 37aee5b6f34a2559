"""`train.init_from`: a new run that starts from another run's weights and vocabulary (fine-tuning).

The new run keeps the checkpoint's tokenizer (its pieces are what the embeddings mean) and needs the same model
shape; dropout may differ, as may `max_positions` (the position table is computed, not saved). Optimizer, learning
rate schedule, step and best loss start afresh. Once the new run has a checkpoint of its own, it resumes from that.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointError, checkpoint_dir, load_checkpoint, resolve_checkpoint
from .config import Config, ConfigError

log = logging.getLogger(__name__)

# the model keys the weights' shapes and meaning depend on
ARCHITECTURE_KEYS = ("d_model", "n_heads", "d_ff", "n_enc_layers", "n_dec_layers", "norm", "activation", "tie_embeddings")


def init_checkpoint(cfg: Config, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `train.init_from` names, checked against the config's model; None without one, or when the run
    directory already has a checkpoint to resume (which then wins, with a log line)."""
    if not cfg.train.init_from:
        return None
    if (checkpoint_dir(run_dir) / "last.pt").is_file():  # the resume says so, where it is not the run's own start
        return None
    try:
        path = resolve_checkpoint(cfg.train.init_from)
        saved = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError([f"train.init_from: {e}"]) from None
    saved.pop("optimizer", None)  # a fine-tuning run starts its own
    theirs, ours = saved["config"].get("model", {}), asdict(cfg.model)
    diffs = [f"model.{k}: train.init_from's checkpoint has {theirs.get(k)!r}, the config {ours[k]!r}" for k in ARCHITECTURE_KEYS if theirs.get(k) != ours[k]]
    if diffs:
        raise ConfigError(diffs, f"train.init_from {path} (set the model section to the checkpoint's)")
    data = saved["config"].get("data", {})
    langs = (data.get("src_lang"), data.get("tgt_lang"))
    if saved["tokenizer"].get("tgt") is not None and langs != (cfg.data.src_lang, cfg.data.tgt_lang):
        log.warning("train.init_from: %s has separate vocabularies for %s -> %s, and this run reads %s -> %s: each side's"
                    " text goes through the checkpoint's vocabulary of that side", path, *langs, cfg.data.src_lang, cfg.data.tgt_lang)
    return path, saved
