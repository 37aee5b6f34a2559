"""Held-out evaluation: teacher-forced cross-entropy, perplexity, token accuracy and calibration (ECE,
mean entropy), plus BLEU/chrF of greedy translations through sacrebleu.

The loss here is the plain cross-entropy (no label smoothing), averaged over non-pad target tokens
(EOS included), so it is comparable across runs whatever their smoothing was.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import sacrebleu
import torch
import torch.nn.functional as F

from .batching import make_batches, read_batch
from .beam import check_beam_settings
from .calibration import CalibrationAccumulator
from .checkpoint import load_checkpoint, resolve_checkpoint
from .config import ConfigError, DataConfig
from .data import DataError, load_split
from .decode_workers import decode_in_input_order
from .device import Runtime
from .encoded import encode_split, length_arrays, readable_pairs
from .model import Transformer
from .plot import plot_reliability, require_matplotlib
from .text_input import check_writable
from .tokenizer import PAD_ID
from .translator import Translator, is_blank

log = logging.getLogger(__name__)


@dataclass
class LossMetrics:
    loss: float  # mean cross-entropy per target token, nats, no label smoothing
    perplexity: float
    token_accuracy: float
    sentences: int
    tokens: int


@torch.no_grad()
def teacher_forced_metrics(
    model: Transformer, ds: datasets.Dataset, max_tokens: int, runtime: Runtime, calibration: CalibrationAccumulator | None = None
) -> LossMetrics:
    """Loss, perplexity and accuracy of `model` on an encoded split (columns src_ids, tgt_ids, src_len, tgt_len).

    `calibration`, when given, also gets every batch's logits, so calibration needs no second pass; it is
    optional because validation during training has no use for it.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct = torch.zeros((), dtype=torch.long, device=runtime.device)
    n_tokens = 0
    for index in make_batches(*length_arrays(ds), max_tokens, shuffle=False):
        batch = read_batch(ds, index).to(runtime.device)
        with runtime.compute():
            logits = model(batch.src, batch.tgt_in)
        flat_logits, flat_tgt = logits.float().flatten(0, 1), batch.tgt_out.flatten()
        loss_sum += F.cross_entropy(flat_logits, flat_tgt, ignore_index=PAD_ID, reduction="sum").double()
        correct += ((flat_logits.argmax(-1) == flat_tgt) & (flat_tgt != PAD_ID)).sum()
        if calibration is not None:
            calibration.add_logits(flat_logits, flat_tgt)
        n_tokens += batch.n_tgt_tokens
    model.train(was_training)
    if n_tokens == 0:  # no token, no loss: NaN, never a perfect 0.0
        return LossMetrics(math.nan, math.nan, math.nan, len(ds), 0)
    loss = loss_sum.item() / n_tokens
    return LossMetrics(loss, math.exp(min(loss, 700.0)), correct.item() / n_tokens, len(ds), n_tokens)


@dataclass
class QualityMetrics:
    bleu: float
    chrf: float
    sacrebleu_signature: str
    chrf_signature: str


def bleu_tokenizer(tgt_lang: str) -> str:
    """sacrebleu's tokenizer for the target language (an ISO 639-1 or -3 code, with or without a region or script):
    Chinese, Japanese and Korean need their own, others use 13a."""
    lang = tgt_lang.lower().split("-")[0].split("_")[0]
    # Chinese under its ISO 639 codes: the macrolanguage, Mandarin, and the other varieties written without spaces
    # (Cantonese, Wu, Min Nan, Hakka, Literary Chinese, Gan, Xiang, Jin, Min Dong, Min Zhong, Pu-Xian, Min Bei)
    chinese = ("zh", "zho", "chi", "cmn", "yue", "wuu", "nan", "hak", "lzh", "gan", "hsn", "cjy", "cdo", "czh", "cpx", "mnp")
    japanese, korean = ("ja", "jpn"), ("ko", "kor")
    return "zh" if lang in chinese else "ja-mecab" if lang in japanese else "ko-mecab" if lang in korean else "13a"


def bleu_metric(tgt_lang: str) -> sacrebleu.metrics.BLEU:
    """sacrebleu's BLEU for the target language; a tokenizer whose extras are missing (ja-mecab, ko-mecab) is a
    DataError, raised before any decoding."""
    tokenize = bleu_tokenizer(tgt_lang)
    try:
        return sacrebleu.metrics.BLEU(tokenize=tokenize)
    except (RuntimeError, ImportError) as e:
        raise DataError(
            f"data.tgt_lang {tgt_lang!r}: BLEU's {tokenize!r} tokenizer needs extra packages ({str(e).strip().splitlines()[0]});"
            f" install them, e.g. pip install 'sacrebleu[{tokenize[:2]}]', or evaluate with --no-bleu"
        ) from None


def quality_metrics(hypotheses: list[str], references: list[str], bleu: sacrebleu.metrics.BLEU) -> QualityMetrics:
    """BLEU (`bleu_metric`'s, for the target language) and chrF of the hypotheses against one reference each."""
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return QualityMetrics(b.score, c.score, str(bleu.get_signature()), str(chrf.get_signature()))


def metrics_dict(loss: LossMetrics, quality: QualityMetrics | None) -> dict:
    out = asdict(loss)
    if quality is not None:
        out.update(asdict(quality))
    return out


def evaluate_checkpoint(
    checkpoint: str,
    *,
    split: str = "test",
    data_file: str | None = None,
    limit: int = 0,
    with_bleu: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    decode: dict[str, Any] | None = None,
    plot_dir: str | Path | None = None,
    beam_size: int = 1,
    length_penalty: float = 1.0,
) -> dict:
    """Everything `nmtkit evaluate` reports, as one dict (the `--json` output).

    plot_dir: also draw the reliability diagram into plot_dir/reliability.png. decode: decode settings to use in place
    of the checkpoint's (the command line's batch size, workers, length budget).
    """
    t0 = time.time()
    if plot_dir is not None:  # fail before the evaluation, not after it
        require_matplotlib()
        check_writable(str(Path(plot_dir) / "reliability.png"), "--plot")
    file = resolve_checkpoint(checkpoint)  # read once: a run still training may replace best.pt in the meantime
    state = load_checkpoint(file)
    translator = Translator.from_state(state, file, device, precision)
    cfg = translator.cfg
    if with_bleu and beam_size > 1:
        try:
            check_beam_settings(beam_size, 1, translator.tokenizer.tgt_vocab_size)
        except ValueError as e:
            raise ConfigError([f"--beam {beam_size}: {e}"]) from None
    cfg.decode = dataclasses.replace(cfg.decode, **(decode or {}))
    bleu = bleu_metric(cfg.data.tgt_lang) if with_bleu else None  # missing tokenizer extras fail now, not after decoding
    data_cfg = evaluation_data(cfg.data, split, data_file)
    # the checkpoint's data paths are its training run's, relative to where that ran; evaluate reads another with --data
    key, fix = ("--data", "check the path") if data_file else (f"data.{split}", "run where the training ran, or pass --data PATH")
    raw = load_split(data_cfg, split, _cache_dir(cfg.data.cache_dir, file), key=key, fix=fix)
    if limit:
        raw = raw.select(range(min(limit, len(raw))))
    every_pair, report = encode_split(raw, translator.tokenizer, data_cfg, split, apply_filters=False)
    ds, n_too_long = readable_pairs(every_pair, cfg.model.max_positions)
    if len(ds) == 0:
        raise DataError(
            f"{getattr(data_cfg, split)} ({split}): no pairs to evaluate ({report.total:,} read, {n_too_long:,} longer"
            f" than model.max_positions={cfg.model.max_positions}); check the file and --limit"
        )
    calibration = CalibrationAccumulator(device=translator.runtime.device)
    # batches wide enough for the longest readable pair, even where the training batches were narrower
    max_tokens = max(cfg.train.max_tokens, cfg.model.max_positions)
    # The loss as training's validation computes it: fp32 weights under the precision's autocast. The translator's
    # weights are stored in the compute dtype for decoding, which moved a bf16 loss in its fifth digit.
    scorer = translator.model if translator.runtime.precision == "fp32" else Translator.from_state(state, file, device, "fp32").model
    del state
    loss = teacher_forced_metrics(scorer, ds, max_tokens, translator.runtime, calibration)
    del scorer
    calib = calibration.result()
    quality = None
    if bleu is not None:
        # every pair, as sacrebleu scores the whole file: a source longer than the positions is cut (with a warning),
        # as `translate` cuts it
        hypotheses = translate_all(translator, list(every_pair["src"]), beam_size, length_penalty)
        quality = quality_metrics(hypotheses, every_pair["tgt"], bleu)
    out = metrics_dict(loss, quality)
    out.update(ece=calib.ece, mean_entropy=calib.mean_entropy, calibration_bins=[asdict(b) for b in calib.bins])
    if plot_dir is not None:
        out["reliability_plot"] = str(plot_reliability(calib, Path(plot_dir) / "reliability.png"))
    out.update(
        checkpoint=str(file),
        data=getattr(data_cfg, split),
        split=None if data_file else split,  # a --data file is no split of the run's
        label_smoothing_in_loss=False,
        decoding="greedy" if beam_size <= 1 else f"beam {beam_size}, length penalty {length_penalty}",
        filtered_out=n_too_long,  # left out of the loss (not of BLEU and chrF)
        seconds=round(time.time() - t0, 2),
    )
    return out


def evaluation_data(data: DataConfig, split: str, data_file: str | None) -> DataConfig:
    """The run's data settings with `data_file` in place of `split`: read as a local file, even for a model trained on
    a hub corpus (whose split names would otherwise be looked up on the hub)."""
    if not data_file:
        return data
    overrides: dict[str, Any] = {split: data_file, "hub_name": "", "hub_config": ""}  # mypy checks a str-keyed ** against every field's type
    return dataclasses.replace(data, **overrides)


def _cache_dir(configured: str, checkpoint: Path) -> str:
    """Where the evaluated split's Arrow tables go: data.cache_dir, else the run's cache when the checkpoint sits in a
    run directory's checkpoints/ (the run's config.yaml beside it), else the `datasets` cache (never a folder beside a
    loose .pt file)."""
    if configured:
        return configured
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        cache = run_dir / "cache"
        if os.access(cache if cache.is_dir() else run_dir, os.W_OK):
            return str(cache)
        log.info("%s is not writable (a read-only run directory): the evaluated data's tables go to the datasets cache", cache)
    return str(datasets.config.HF_DATASETS_CACHE)


def translate_all(translator: Translator, texts: list[str], beam_size: int = 1, length_penalty: float = 1.0) -> list[str]:
    """Greedy (or beam) translations in input order, decoded in length-sorted batches to keep padding low."""
    def one_batch(idx: list[int]) -> list[str]:
        src = translator.encode_source([texts[i] for i in idx])
        if beam_size > 1:
            result = translator.beam_search_ids(src, beam_size, length_penalty=length_penalty).rank(0)
        else:
            result = translator.translate_ids(src)
        return [
            "" if is_blank(texts[i]) else translator.tokenizer.decode_tgt(result.tokens[row, : int(result.lengths[row])].tolist())
            for row, i in enumerate(idx)
        ]

    d = translator.cfg.decode
    return decode_in_input_order(one_batch, texts, d.batch_size, translator.workers, d.processes)


def format_metrics(m: dict) -> str:
    rows = [
        ("data", f"{m['data']} ({m['split']})" if m["split"] else m["data"]),
        ("sentences", f"{m['sentences']:,}" + (f" ({m['filtered_out']:,} more, longer than model.max_positions, left out of the loss"
                                                f"{'; BLEU and chrF score them' if 'bleu' in m else ''})" if m.get("filtered_out") else "")),
        ("target tokens", f"{m['tokens']:,} (EOS included)"),
        ("loss", f"{m['loss']:.4f} nats/token (plain cross-entropy, no label smoothing)"),
        ("perplexity", f"{m['perplexity']:.2f}"),
        ("token accuracy", f"{100 * m['token_accuracy']:.2f}%"),
    ]
    if "ece" in m:
        n_bins = len(m["calibration_bins"])
        rows += [
            ("ECE", f"{m['ece']:.4f} (top-1 probability vs accuracy under teacher forcing, {n_bins} bins)"),
            ("mean entropy", f"{m['mean_entropy']:.4f} nats/token"),
        ]
    if "reliability_plot" in m:
        rows.append(("reliability", m["reliability_plot"]))
    if "bleu" in m:
        rows += [("decoding", m["decoding"]), ("BLEU", f"{m['bleu']:.2f}"), ("chrF", f"{m['chrf']:.2f}"), ("signature", m["sacrebleu_signature"]), ("chrF signature", m["chrf_signature"])]
    rows.append(("time", f"{m['seconds']:.1f}s"))
    return "\n".join(f"{k:>15}  {v}" for k, v in rows)
