"""Beam search: width 1 is greedy decoding, the n-best are distinct and sorted by their length-normalised scores,
every recorded probability is what a full forward pass gives for that hypothesis (so the histories followed their
beams through reordering), budgets end hypotheses with EOS, and the API and CLI expose the n-best."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nmtkit.beam import beam_search
from nmtkit.cli import main
from nmtkit.decode import greedy_decode, max_new_tokens
from nmtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmtkit.translator import Translator
from test_model import make_model, random_ids

pytestmark = pytest.mark.usefixtures("one_thread")


SOURCES = ["Tell me something about yourself", "Hello.", "I like cats very much.", "Where is the station?"]


def long_talking_model():
    """The random test model, with EOS made unlikely, so outputs run for several steps instead of stopping at once."""
    model = make_model()
    with torch.no_grad():
        model.tgt_embed.weight[EOS_ID] *= 0.2  # tied: shrinks EOS's logit towards 0
    return model


def padded_sources() -> torch.Tensor:
    torch.manual_seed(1)
    src = random_ids(4, 9)
    src[1, 5:] = PAD_ID
    src[3, 3:] = PAD_ID
    return src


def assert_same_as_greedy(greedy, best) -> None:
    assert torch.equal(best.lengths, greedy.lengths)
    for b, n in enumerate(greedy.lengths.tolist()):
        assert torch.equal(best.tokens[b, :n], greedy.tokens[b, :n])
        torch.testing.assert_close(best.probs[b, :n], greedy.probs[b, :n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(best.entropy[b, :n], greedy.entropy[b, :n], atol=1e-6, rtol=1e-6)
        assert torch.equal(best.top_ids[b, :n], greedy.top_ids[b, :n])


@pytest.mark.parametrize("make", [make_model, long_talking_model], ids=["stops-early", "runs-to-budget"])
def test_beam_of_one_gives_greedy_tokens_and_probabilities_on_a_random_model(make) -> None:
    model, src = make(), padded_sources()
    budget = torch.tensor([3, 12, 7, 20])
    greedy = greedy_decode(model, src, budget, top_k=3)
    beam = beam_search(model, src, budget, beam_size=1, top_k=3)
    assert_same_as_greedy(greedy, beam.rank(0))


def test_beam_of_one_gives_greedy_tokens_and_probabilities_on_the_trained_model(trained_run: Path) -> None:
    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    src = translator.encode_source(SOURCES)
    greedy = translator.translate_ids(src, top_k=3)
    beam = translator.beam_search_ids(src, beam_size=1, top_k=3)
    assert_same_as_greedy(greedy, beam.rank(0))


def test_recorded_statistics_match_a_full_forward_pass_of_each_hypothesis() -> None:
    """The per-token history is gathered by beam index every step; a slip would pair tokens with another beam's numbers."""
    model, src = long_talking_model(), padded_sources()
    out = beam_search(model, src, torch.tensor([5, 9, 7, 6]), beam_size=4, nbest=4, top_k=5)
    with torch.no_grad():
        for n in range(4):
            tokens = out.tokens[:, n]  # (B, L)
            tgt_in = torch.cat([torch.full((4, 1), BOS_ID), tokens[:, :-1]], dim=1).masked_fill(tokens == PAD_ID, PAD_ID)
            probs = model(src, tgt_in).softmax(-1)  # (B, L, V)
            real = tokens != PAD_ID
            chosen = probs.gather(-1, tokens[..., None])[..., 0]
            torch.testing.assert_close(out.probs[:, n][real], chosen[real], atol=1e-5, rtol=1e-4)
            top_probs, top_ids = probs.topk(5, dim=-1)
            assert torch.equal(out.top_ids[:, n][real], top_ids[real])
            entropy = -(probs * probs.log()).sum(-1)
            torch.testing.assert_close(out.entropy[:, n][real], entropy[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_scores_are_summed_log_probability_over_length_to_the_alpha_sorted_best_first(alpha: float) -> None:
    model, src = make_model(), padded_sources()
    out = beam_search(model, src, 10, beam_size=5, nbest=5, alpha=alpha)
    for b in range(src.size(0)):
        scores = out.scores[b].tolist()
        assert scores == sorted(scores, reverse=True)
        for n in range(5):
            length = int(out.lengths[b, n])
            log_prob = out.probs[b, n, :length].log().sum()
            torch.testing.assert_close(out.log_probs[b, n], log_prob, atol=1e-4, rtol=1e-4)
            assert scores[n] == pytest.approx(out.log_probs[b, n].item() / length**alpha, rel=1e-5)  # fairseq's lenpen


def test_hypotheses_of_a_sentence_are_distinct_and_end_with_eos_within_the_budget() -> None:
    model, src = long_talking_model(), padded_sources()
    budget = max_new_tokens(src, a=0.5, b=2, limit=64)
    out = beam_search(model, src, budget, beam_size=4, nbest=4)
    for b in range(src.size(0)):
        seen = set()
        for n in range(4):
            length = int(out.lengths[b, n])
            assert 1 <= length <= budget[b]
            row = out.tokens[b, n]
            assert row[length - 1] == EOS_ID and (row[length:] == PAD_ID).all() and (row[: length - 1] != EOS_ID).all()
            seen.add(tuple(row[:length].tolist()))
        assert len(seen) == 4


def test_a_sentence_in_a_padded_batch_gets_the_same_hypotheses_as_alone() -> None:
    model, src = make_model(), padded_sources()
    batch = beam_search(model, src, 8, beam_size=3, nbest=3)
    for b in range(src.size(0)):
        alone_src = src[b : b + 1, : int((src[b] != PAD_ID).sum())]
        alone = beam_search(model, alone_src, 8, beam_size=3, nbest=3)
        assert torch.equal(alone.lengths[0], batch.lengths[b])
        for n in range(3):
            n_tok = int(alone.lengths[0, n])
            assert torch.equal(alone.tokens[0, n, :n_tok], batch.tokens[b, n, :n_tok])
        torch.testing.assert_close(alone.scores[0], batch.scores[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("beam_size", "nbest", "message"), [(0, 1, "at least 1"), (2, 3, "between 1 and the beam size"), (30, 1, "vocabulary")]
)
def test_impossible_beam_settings_raise_naming_the_value(beam_size: int, nbest: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        beam_search(make_model(), random_ids(1, 4), 5, beam_size=beam_size, nbest=nbest)


# ----------------------------------------------------------------------------- Translator and CLI


def test_translate_with_nbest_lists_that_many_hypotheses_best_first(trained_run: Path) -> None:
    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    results = translator.translate(SOURCES, beam_size=4, nbest=3)
    for result in results:
        assert len(result.nbest) == 3
        scores = [h.score for h in result.nbest]
        assert scores == sorted(scores, reverse=True)
        best = result.nbest[0]  # the Translation's own fields hold the best hypothesis
        assert result.translation == best.translation and [t.id for t in result.tokens] == [t.id for t in best.tokens]
        for h in result.nbest:
            assert h.tokens[-1].id == EOS_ID
            assert h.total_loss == pytest.approx(sum(t.loss for t in h.tokens))
            assert h.score == pytest.approx(-h.total_loss / len(h.tokens), rel=1e-5)  # alpha 1: mean ln p


def translate_out(capsys, argv: list[str]) -> str:
    assert main(["translate", *argv]) == 0
    return capsys.readouterr().out


def test_cli_nbest_text_lists_hypotheses_with_scores(trained_run: Path, capsys) -> None:
    out = translate_out(capsys, ["--checkpoint", str(trained_run), "--beam", "4", "--nbest", "3", *SOURCES[:2]])
    assert out.count("source:") == 2 and out.count("n-best") == 2
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 1, 2, 3]
    for first in (0, 3):
        scores = [float(r[1]) for r in rows[first : first + 3]]
        assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)


def test_cli_nbest_jsonl_adds_the_nbest_key(trained_run: Path, capsys) -> None:
    out = translate_out(
        capsys, ["--checkpoint", str(trained_run), "--format", "jsonl", "--beam", "3", "--nbest", "2", SOURCES[0]]
    )
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert len(record["nbest"]) == 2
    for h in record["nbest"]:
        assert set(h) == {"translation", "score", "total_loss", "tokens"}
        assert math.isfinite(h["score"]) and h["tokens"][-1]["piece"] == "</s>"
    assert record["translation"] == record["nbest"][0]["translation"]


def test_cli_nbest_above_the_beam_exits_2(trained_run: Path, capsys) -> None:
    assert main(["translate", "--checkpoint", str(trained_run), "--beam", "2", "--nbest", "3", "Hello."]) == 2
    err = capsys.readouterr().err
    assert any(line.startswith("nmtkit translate: error: --beam 2 --nbest 3: ") for line in err.splitlines()) and "Traceback" not in err
    assert "config problem" not in err  # a flag, not a config file
