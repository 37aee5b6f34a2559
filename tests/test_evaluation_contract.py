"""What evaluation and translation promise: the evaluation loss averages over real target tokens only, the beam size
and length penalty asked for reach beam search, and a run with separate vocabularies encodes its sources with the
source model."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F

import nmtkit.translator as translator_module
from conftest import tiny_config
from nmtkit.cli import main
from nmtkit.config import ModelConfig
from nmtkit.device import choose_runtime
from nmtkit.evaluate import teacher_forced_metrics
from nmtkit.model import Transformer
from nmtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmtkit.train import train
from nmtkit.translator import Translator

V = 60
SOURCES = ["Tell me something about yourself.", "Hello.", "I like cats very much.", "Where is the station?"]


pytestmark = pytest.mark.usefixtures("one_thread")


def record_beam_search(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Replace the beam_search the translator calls with one that records its settings and then searches."""
    calls: list[dict] = []
    real = translator_module.beam_search

    def recording(model, src, max_len, **kwargs):
        calls.append(kwargs)
        return real(model, src, max_len, **kwargs)

    monkeypatch.setattr(translator_module, "beam_search", recording)
    return calls


# ----------------------------------------------------------------------------- 7. the loss ignores padding


def test_evaluation_loss_is_the_token_weighted_mean_of_each_pairs_own_loss_whatever_the_padding() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, d_ff=64, n_enc_layers=1, n_dec_layers=1, dropout=0.0, max_positions=64)
    model = Transformer(cfg, V, V, True).eval()
    rows = {
        "src_ids": [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16], [17]],
        "tgt_ids": [[20, 21, 22, 23, 24, 25, 26, 27, 28], [29], [30, 31], [32, 33, 34]],
    }
    ds = datasets.Dataset.from_dict({**rows, "src_len": [len(x) for x in rows["src_ids"]], "tgt_len": [len(x) for x in rows["tgt_ids"]]})
    # each pair alone, unpadded
    total, tokens = 0.0, 0
    with torch.no_grad():
        for src_ids, tgt_ids in zip(rows["src_ids"], rows["tgt_ids"]):
            src = torch.tensor([src_ids + [EOS_ID]])
            tgt_in, tgt_out = torch.tensor([[BOS_ID] + tgt_ids]), torch.tensor(tgt_ids + [EOS_ID])
            total += F.cross_entropy(model(src, tgt_in)[0], tgt_out, reduction="sum").item()
            tokens += len(tgt_out)
    runtime = choose_runtime("cpu", "fp32")
    one_padded_batch = teacher_forced_metrics(model, ds, 64, runtime)  # all four pairs in one batch: padding
    smaller_batches = teacher_forced_metrics(model, ds, 10, runtime)  # three batches, less padding
    assert one_padded_batch.tokens == smaller_batches.tokens == tokens
    assert one_padded_batch.loss == pytest.approx(total / tokens, rel=1e-5)
    assert smaller_batches.loss == pytest.approx(total / tokens, rel=1e-5)


# ----------------------------------------------------------------------------- 10. beam settings reach beam search


def test_evaluate_decodes_with_the_beam_size_and_length_penalty_it_was_given(trained_run: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = record_beam_search(monkeypatch)
    argv = ["evaluate", "--json", "--checkpoint", str(trained_run), "--device", "cpu", "--limit", "4", "--workers", "1",
            "--beam", "3", "--length-penalty", "0.6"]
    assert main(argv) == 0
    assert '"decoding": "beam 3, length penalty 0.6"' in capsys.readouterr().out
    assert calls and all(c["beam_size"] == 3 and c["alpha"] == 0.6 for c in calls)


def test_translate_passes_the_beam_size_and_length_penalty_to_beam_search(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_beam_search(monkeypatch)
    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    translator.cfg.decode.workers = 1  # decoded here, where the recording is
    results = translator.translate(SOURCES, beam_size=3, nbest=2, length_penalty=0.6)
    assert calls and all(c["beam_size"] == 3 and c["alpha"] == 0.6 and c["nbest"] == 2 for c in calls)
    for r in results:  # and the scores are those of alpha 0.6: summed ln p / length ** 0.6
        for h in r.nbest:
            assert h.score == pytest.approx(-h.total_loss / len(h.tokens) ** 0.6, rel=1e-5)


# ----------------------------------------------------------------------------- 11. separate vocabularies


def test_separate_vocabularies_encode_the_source_with_the_source_model(corpus: dict, tmp_path: Path) -> None:
    run = tmp_path / "separate"
    train(tiny_config(corpus, run, tokenizer={"joint": False}, train={"max_steps": 2, "eval_every": 2, "save_every": 2, "log_every": 100}))
    translator = Translator.from_checkpoint(run, "cpu", "fp32")
    tok = translator.tokenizer
    assert not tok.is_joint
    src = translator.encode_source(SOURCES)
    want = tok.encode_src(SOURCES)
    assert want != tok.encode_tgt(SOURCES)  # the two models cut English differently, so the check can tell them apart
    for row, ids in zip(src.tolist(), want):
        assert row[: len(ids) + 1] == ids + [EOS_ID]
        assert all(i == PAD_ID for i in row[len(ids) + 1 :])


def test_validation_during_training_scores_the_split_as_evaluate_does(corpus: dict, tmp_path: Path) -> None:
    """best.pt is chosen on the validation loss, and `nmtkit evaluate --split valid` must find that same loss: the
    training filters (data.max_len, data.max_len_ratio, here strict enough to drop most pairs) do not touch the
    validation split."""
    from nmtkit.evaluate import evaluate_checkpoint

    run = tmp_path / "run"
    result = train(tiny_config(corpus, run, data={"max_len": 12, "max_len_ratio": 1.2}, train={"max_steps": 6, "eval_every": 6}))
    evaluated = evaluate_checkpoint(str(run), split="valid", with_bleu=False, device="cpu", precision="fp32")
    n_valid = sum(1 for line in corpus["valid"].read_text(encoding="utf-8").splitlines() if line.strip())
    assert evaluated["sentences"] == n_valid
    assert result.state.best_valid_loss == pytest.approx(evaluated["loss"], rel=1e-6)
