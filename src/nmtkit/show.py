"""Plain-text rendering of per-token records: the `nmtkit translate --show-tokens` table."""

from __future__ import annotations

import math
import unicodedata

from .records import Translation


def display_width(text: str) -> int:
    """Terminal columns: CJK characters take two, combining marks (Hindi's vowel signs, Thai's tone marks) and
    zero-width format characters none."""
    return sum(0 if unicodedata.category(ch) in ("Mn", "Me", "Cf") else 2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def pad(text: str, width: int) -> str:
    return text + " " * max(0, width - display_width(text))


def _piece(piece: str) -> str:
    return piece if piece.strip() else repr(piece)


def format_translation(result: Translation, *, show_bits: bool = False, show_tokens: bool = True) -> str:
    lines = [f"source:      {result.source}", f"translation: {result.translation}"]
    lines += format_nbest(result)
    if show_tokens and not result.tokens:
        lines += ["", "  a blank source: nothing was translated"]
    elif show_tokens:
        width = max([display_width(_piece(s.piece)) for s in result.tokens] + [5]) + 2
        head = f"  {'pos':>3}  {pad('piece', width)}{'id':>6}  {'prob':>7}  {'loss':>7}  {'entropy':>7}"
        head += f"  {'bits':>6}" if show_bits else ""
        lines += ["", head + "  top alternatives"]
        for s in result.tokens:
            row = f"  {s.position:>3}  {pad(_piece(s.piece), width)}{s.id:>6}  {s.prob:7.4f}  {s.loss:7.4f}  {s.entropy:7.4f}"
            row += f"  {s.entropy / math.log(2):6.3f}" if show_bits else ""  # 10 bits and more from 1,024 pieces on
            alts = "  ".join(f"{_piece(a.piece)} {a.prob:.3f}" for a in s.top_k)
            lines.append(f"{row}  {alts}")
        lines.append(f"  total loss {result.total_loss:.4f} | mean loss {result.mean_loss:.4f} over {len(result.tokens)} tokens (EOS included)")
        if result.truncated:
            lines.append("  truncated: the length budget ended the output (decode.max_len_a/max_len_b); </s> was not the model's choice")
    ref = result.reference
    if ref is not None:
        lines += ["", f"reference:   {ref.text}   (teacher forcing)"]
        width = max([display_width(_piece(t.piece)) for t in ref.tokens] + [5]) + 2
        lines.append(f"  {'pos':>3}  {pad('piece', width)}{'id':>6}  {'prob':>7}  {'loss':>7}  greedy")
        for t in ref.tokens:
            mark = "yes" if t.greedy_match else "no"
            lines.append(f"  {t.position:>3}  {pad(_piece(t.piece), width)}{t.id:>6}  {t.prob:7.4f}  {t.loss:7.4f}  {mark}")
        lines.append(f"  total loss {ref.total_loss:.4f} | mean loss {ref.mean_loss:.4f} over {len(ref.tokens)} tokens (= CrossEntropyLoss)")
    return "\n".join(lines)


def format_nbest(result: Translation) -> list[str]:
    """The n-best list of a beam search, one line per hypothesis: rank, score, total loss, text. Empty without one."""
    if not result.nbest:
        return []
    lines = ["", f"  {'rank':>4}  {'score':>8}  {'loss':>8}  n-best (score = sum of ln p / length^alpha)"]
    for rank, h in enumerate(result.nbest, start=1):
        lines.append(f"  {rank:>4}  {h.score:8.4f}  {h.total_loss:8.4f}  {h.translation}")
    return lines
