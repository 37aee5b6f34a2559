"""`Translator`: a trained model and its tokenizer, loaded from a run directory or checkpoint.

It is the public Python API: translate sentences with a per-token record, score a reference with
teacher forcing, or step through the model by hand (encoder memory, next-token logits).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .beam import BeamOutput, beam_search, check_beam_settings
from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from .config import Config, ConfigError, config_from_tree
from .decode import GreedyOutput, ReferenceScores, greedy_decode, max_new_tokens, score_reference
from .decode_workers import decode_in_input_order, resolve_workers
from .device import Runtime, choose_runtime, for_inference
from .model import Transformer, padding_mask
from .records import Alternative, Hypothesis, ReferenceScore, ReferenceToken, TokenStep, Translation, total_and_mean
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, TokenizerError

log = logging.getLogger(__name__)


def build_model(cfg: Config, tokenizer: Tokenizer, attention_kernel: str = "auto") -> Transformer:
    """The model `cfg.model` describes. `attention_kernel` is how it computes attention: training passes
    train.attention_kernel; loading for translation keeps `auto`, whatever the run trained with."""
    return Transformer(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size, tokenizer.is_joint, attention_kernel)


def tokenizer_from_state(state: dict) -> Tokenizer:
    tok = state["tokenizer"]
    return Tokenizer(tok["src"], tok.get("tgt"))


def check_model_matches(model: Transformer, weights: dict[str, Tensor], where: str) -> None:
    """Compare shapes before loading so a mismatch says what differs (vocab size, d_model, ...)."""
    own = model.state_dict()
    problems = []
    for name, tensor in weights.items():
        if name in own and own[name].shape != tensor.shape:
            problems.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    if missing:
        problems.append(f"missing in checkpoint: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"not in this model: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise CheckpointError(f"{where} does not match its config/tokenizer:\n  " + "\n  ".join(problems))


class Translator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, cfg: Config, runtime: Runtime) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.runtime = runtime

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "fp32") -> Translator:
        """Load from a run directory (its best checkpoint) or a checkpoint file."""
        file = resolve_checkpoint(path)
        return cls.from_state(load_checkpoint(file), file, device, precision)

    @classmethod
    def from_state(cls, state: dict, file: Path, device: str = "auto", precision: str = "fp32") -> Translator:
        """From a checkpoint already loaded (`load_checkpoint(file)`), so that two models of one read agree."""
        runtime = choose_runtime(device, precision)
        try:
            cfg = config_from_tree(state["config"], source=str(file))
            tokenizer = tokenizer_from_state(state)
        except (ConfigError, TokenizerError) as e:
            raise CheckpointError(f"{file}: {e}") from None
        model = build_model(cfg, tokenizer)
        check_model_matches(model, state["model"], str(file))
        model.load_state_dict(state["model"])
        log.info("loaded %s (step %s); %s", file, state.get("step", "?"), runtime.reason)
        return cls(for_inference(model, runtime), tokenizer, cfg, runtime)

    # -- the pieces, for stepping through by hand -----------------------------------------

    def encode_source(self, texts: list[str]) -> Tensor:
        """Texts -> (B, S) source ids with EOS, right-padded. Inputs longer than the model's
        positions are truncated, with a warning."""
        limit = self.cfg.model.max_positions - 1
        rows = []
        for text, ids in zip(texts, self.tokenizer.encode_src([_clean(t) for t in texts])):
            if len(ids) > limit:
                log.warning("source truncated from %d to %d pieces (model.max_positions): %.40s...", len(ids), limit, text)
                ids = ids[:limit]
            rows.append(torch.tensor(ids + [EOS_ID], dtype=torch.long))
        return pad_sequence(rows, batch_first=True, padding_value=PAD_ID).to(self.runtime.device)

    def encode_target(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Reference texts -> tgt_in (BOS + ids) and tgt_out (ids + EOS), each (B, T)."""
        limit = self.cfg.model.max_positions - 1
        ids = self.tokenizer.encode_tgt([_clean(t) for t in texts])
        for text, i in zip(texts, ids):
            if len(i) > limit:  # scored as cut here, with an EOS the reference does not have there
                log.warning("reference truncated from %d to %d pieces (model.max_positions): %.40s...", len(i), limit, text)
        ids = [i[:limit] for i in ids]
        tgt_in = pad_sequence([torch.tensor([BOS_ID] + i) for i in ids], batch_first=True, padding_value=PAD_ID)
        tgt_out = pad_sequence([torch.tensor(i + [EOS_ID]) for i in ids], batch_first=True, padding_value=PAD_ID)
        return tgt_in.to(self.runtime.device), tgt_out.to(self.runtime.device)

    @torch.no_grad()
    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """(B, S) ids -> encoder memory (B, S, D) and the source padding mask (B, 1, 1, S)."""
        src_mask = padding_mask(src)
        with self.runtime.compute():
            return self.model.encode(src, src_mask), src_mask

    @torch.no_grad()
    def logits(self, memory: Tensor, src_mask: Tensor, prefix: Tensor) -> Tensor:
        """Next-token logits (B, T, V) for every position of prefix (B, T), which starts with BOS."""
        with self.runtime.compute():
            return self.model.project(self.model.decode(memory, src_mask, prefix)).float()

    # -- whole sentences ----------------------------------------------------------------------

    def translate(
        self,
        texts: list[str],
        references: list[str] | None = None,
        top_k: int | None = None,
        beam_size: int = 1,
        nbest: int = 1,
        length_penalty: float = 1.0,
    ) -> list[Translation]:
        """Translations with per-token records, in input order, decoded in length-sorted batches of `decode.batch_size`.

        beam_size 1 is greedy decoding. A larger beam runs beam search (beam.py): each Translation holds its best
        hypothesis, and with nbest > 1 also `nbest`, that many hypotheses best first. length_penalty is beam
        search's exponent alpha: hypotheses rank by summed ln p / length**alpha.
        """
        if isinstance(texts, str):  # a str is a sequence too: one "sentence" per character
            raise TypeError("texts: a list of sentences, not one str; use translate([text])")
        if references is not None and len(references) != len(texts):
            raise ValueError(f"{len(texts)} sources but {len(references)} references")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}: alternatives per token must be at least 1 (None: decode.top_k of the run)")
        if not math.isfinite(length_penalty):
            raise ValueError(f"length_penalty={length_penalty}: expected a finite number")
        check_beam_settings(beam_size, nbest, self.tokenizer.tgt_vocab_size)
        k = min(top_k or self.cfg.decode.top_k, self.tokenizer.tgt_vocab_size)

        def refs(idx: list[int]) -> list[str] | None:
            return [references[i] for i in idx] if references is not None else None

        def decode(idx: list[int]) -> DecodedBatch:  # in a decoding worker
            return self._decode_batch([texts[i] for i in idx], refs(idx), k, beam_size, nbest, length_penalty)

        def records(idx: list[int], decoded: DecodedBatch) -> list[Translation]:  # here
            return self._records([texts[i] for i in idx], refs(idx), decoded)

        d = self.cfg.decode
        return decode_in_input_order(decode, texts, d.batch_size, self.workers, d.processes, finish=records)

    @property
    def workers(self) -> int:
        """Batches decoded at once (`decode_workers.py`): decode.workers, or one per CPU thread when it is 0."""
        return resolve_workers(self.cfg.decode.workers, self.runtime.device)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Greedy steps replayed as CUDA graphs (decode.cuda_graphs, on CUDA only)."""
        return self.cfg.decode.cuda_graphs and self.runtime.device.type == "cuda"

    def budget(self, src: Tensor) -> Tensor:
        """(B,) output length budget of each source (EOS included): decode.max_len_a/max_len_b, capped by the positions."""
        d = self.cfg.decode
        return max_new_tokens(src, d.max_len_a, d.max_len_b, self.cfg.model.max_positions)

    def translate_ids(self, src: Tensor, top_k: int = 0, budget: Tensor | None = None) -> GreedyOutput:
        """Greedy decoding of (B, S) source ids under the configured length budget (`budget(src)` unless given)."""
        with self.runtime.compute():
            return greedy_decode(self.model, src, self.budget(src) if budget is None else budget, top_k=top_k, static=self.uses_cuda_graphs)

    def beam_search_ids(
        self, src: Tensor, beam_size: int, nbest: int = 1, top_k: int = 0, length_penalty: float = 1.0, budget: Tensor | None = None
    ) -> BeamOutput:
        """Beam search of (B, S) source ids under the length budget greedy uses (`budget(src)` unless given)."""
        budget = self.budget(src) if budget is None else budget
        with self.runtime.compute():
            return beam_search(self.model, src, budget, beam_size=beam_size, nbest=nbest, top_k=top_k, alpha=length_penalty)

    def _decode_batch(
        self, texts: list[str], references: list[str] | None, k: int, beam_size: int, nbest: int, length_penalty: float
    ) -> DecodedBatch:
        src = self.encode_source(texts)
        budget = self.budget(src)
        # Greedy stays its own path (no beam bookkeeping); beam search of width 1 gives the same tokens anyway.
        beam = self.beam_search_ids(src, beam_size, nbest, k, length_penalty, budget) if beam_size > 1 else None
        out = beam.rank(0) if beam is not None else self.translate_ids(src, top_k=k, budget=budget)
        scores = None
        if references is not None:
            tgt_in, tgt_out = self.encode_target(references)
            with self.runtime.compute():
                scores = score_reference(self.model, src, tgt_in, tgt_out)
            # (B, T, V): not needed, and large to send back from a helper; a fresh empty tensor, since a [:0] view
            # pickles its whole storage
            scores = dataclasses.replace(scores, logits=scores.logits.new_empty((0, *scores.logits.shape[1:])))
        return DecodedBatch(out, beam if nbest > 1 else None, scores, budget)

    def _records(self, texts: list[str], references: list[str] | None, decoded: DecodedBatch) -> list[Translation]:
        """One batch's tensors -> its Translations. Runs in the caller: Python objects by the thousand are slower to
        send back from a worker process than to build from the tensors (unpickling them took 0.14 s for 807
        sentences, building them less)."""
        out, beam, scores = decoded.out, decoded.beam, decoded.scores
        results = []
        for b, text in enumerate(texts):
            ref = self._reference_score(references[b], scores, b) if references is not None and scores else None
            if is_blank(text):
                results.append(Translation(text, "", [], 0.0, 0.0, ref, [Hypothesis("", 0.0, 0.0, [])] if beam is not None else []))
                continue
            steps = self._token_steps(out, b)
            total, mean = total_and_mean([s.loss for s in steps])
            ids = out.tokens[b, : int(out.lengths[b])].tolist()
            hypotheses = self._hypotheses(beam, b) if beam is not None else []
            truncated = len(steps) == int(decoded.budget[b]) and steps[-1].top_k[0].id != EOS_ID
            results.append(Translation(text, self.tokenizer.decode_tgt(ids), steps, total, mean, ref, hypotheses, truncated))
        return results

    def _hypotheses(self, beam: BeamOutput, b: int) -> list[Hypothesis]:
        """Sentence b's n-best list, best first."""
        out = []
        for n, score in enumerate(beam.scores[b].tolist()):
            if not math.isfinite(score):  # a slot no hypothesis reached (only with a budget of one token)
                continue
            steps = self._token_steps(beam.rank(n), b)
            text = self.tokenizer.decode_tgt([s.id for s in steps])
            out.append(Hypothesis(text, score, sum(s.loss for s in steps), steps))
        return out

    def _token_steps(self, out: GreedyOutput, b: int) -> list[TokenStep]:
        assert out.probs is not None and out.entropy is not None and out.top_ids is not None and out.top_probs is not None
        assert out.losses is not None  # recorded with the probabilities
        n = int(out.lengths[b])
        ids, probs, ents = out.tokens[b, :n].tolist(), out.probs[b, :n].tolist(), out.entropy[b, :n].tolist()
        losses = out.losses[b, :n].tolist()
        top_ids, top_probs = out.top_ids[b, :n].tolist(), out.top_probs[b, :n].tolist()
        piece = self.tokenizer.tgt_piece
        return [
            TokenStep(
                position=t,
                piece=piece(ids[t]),
                id=ids[t],
                prob=probs[t],
                loss=losses[t],
                entropy=ents[t],
                top_k=[Alternative(piece(i), i, p) for i, p in zip(top_ids[t], top_probs[t])],
            )
            for t in range(n)
        ]

    def _reference_score(self, text: str, scores: ReferenceScores, b: int) -> ReferenceScore:
        n = int(scores.mask[b].sum())
        ids = self.tokenizer.encode_tgt([_clean(text)])[0][: n - 1] + [EOS_ID]
        probs, losses, greedy = scores.probs[b, :n].tolist(), scores.losses[b, :n].tolist(), scores.is_greedy[b, :n].tolist()
        tokens = [
            ReferenceToken(t, self.tokenizer.tgt_piece(ids[t]), ids[t], probs[t], losses[t], bool(greedy[t])) for t in range(n)
        ]
        total, mean = total_and_mean(losses)
        return ReferenceScore(text, tokens, total, mean)


@dataclass
class DecodedBatch:
    """What decoding one batch gives, before it becomes records: tensors only, cheap to send from a worker process."""

    out: GreedyOutput  # each sentence's (best) translation
    beam: BeamOutput | None  # every hypothesis, when an n-best list was asked for
    scores: ReferenceScores | None  # the references' token scores (without the logits)
    budget: Tensor  # (B,) each sentence's output length budget, EOS included


def is_blank(text: str) -> bool:
    """A blank source (or one of control characters) stays blank in every output, as line-aligned files need:
    decoded from </s> alone, the model would invent a sentence."""
    return not _clean(text).strip()


def _clean(text: str) -> str:
    """Drop control characters other than whitespace, and the surrogates that stand for undecodable input bytes: they
    carry no meaning for translation. Format characters stay: the zero-width (non-)joiners are part of Persian and
    Hindi spelling, and the training data keeps them."""
    return "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cs"))
