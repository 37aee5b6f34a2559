"""A self-contained HTML page of translations: `nmtkit translate --html out.html`.

Each target token is a box coloured by its probability (red for 0, through yellow, to green for 1), and
hovering shows its probability, loss (−ln p), entropy and the top-k alternatives. A reference, scored with
teacher forcing, is shown beside the translation with each token's loss under it. The page has inline CSS
and no scripts or links, so it opens offline and can be mailed as one file. Every piece of text goes
through `html.escape`, because tokens are model output and may hold `<`, `&` or quotes.
"""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

from .records import Hypothesis, ReferenceScore, TokenStep, Translation

_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair, or an undecodable byte under surrogateescape
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 80em; }
h1 { font-size: 1.4em; } h2 { font-size: 1.05em; margin-bottom: .3em; } h3 { font-size: .9em; color: #555; margin: .4em 0; }
section { border-top: 1px solid #ccc; padding: .5em 0 1em; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 2em; }
.text { font-size: 1.1em; margin: .2em 0 .5em; }
.tok { display: inline-block; padding: .15em .3em; margin: .1em; border-radius: .25em; white-space: pre; cursor: help;
       text-align: center; vertical-align: top; }
.tok sub { display: block; font-size: .7em; color: #444; }
.miss { outline: 1px dashed #a00; }
.sum, .legend { color: #555; font-size: .85em; }
.nbest { font-size: .9em; } .nbest .score { color: #555; font-family: monospace; margin-right: .8em; }
"""


def probability_colour(p: float) -> str:
    """A CSS colour for probability p: hue 0 (red) at p = 0 to 120 (green) at p = 1, through yellow."""
    return f"hsl({120.0 * min(max(p, 0.0), 1.0):.0f}, 75%, 80%)"


def _box(piece: str, prob: float, title: str, note: str = "", extra_class: str = "") -> str:
    """One token box; `note` (already escaped) goes under the piece."""
    cls = f"tok {extra_class}".strip()
    sub = f"<sub>{note}</sub>" if note else ""
    return (
        f'<span class="{cls}" style="background: {probability_colour(prob)}" title="{escape(title)}">{escape(piece)}{sub}</span>'
    )


def _token_title(step: TokenStep) -> str:
    alternatives = ", ".join(f"{a.piece} {a.prob:.4f}" for a in step.top_k)
    return (
        f"position {step.position}, id {step.id}\nprob {step.prob:.4f}\nloss {step.loss:.4f}\n"
        f"entropy {step.entropy:.4f} nats ({step.entropy_bits:.4f} bits)\ntop-k: {alternatives}"
    )


def _tokens_block(heading: str, text: str, tokens: list[TokenStep], total_loss: float, mean_loss: float) -> str:
    boxes = "".join(_box(t.piece, t.prob, _token_title(t)) for t in tokens)
    return (
        f'<div><h3>{escape(heading)}</h3><p class="text">{escape(text)}</p><div>{boxes}</div>'
        f'<p class="sum">total loss {total_loss:.4f} | mean loss {mean_loss:.4f} over {len(tokens)} tokens (EOS included)</p></div>'
    )


def _reference_block(ref: ReferenceScore) -> str:
    boxes = []
    for t in ref.tokens:
        title = f"position {t.position}, id {t.id}\nprob {t.prob:.4f}\nloss {t.loss:.4f}\ngreedy pick: {'yes' if t.greedy_match else 'no'}"
        boxes.append(_box(t.piece, t.prob, title, note=f"{t.loss:.2f}", extra_class="" if t.greedy_match else "miss"))
    return (
        f"<div><h3>reference (teacher forcing; loss under each token, dashed: not the greedy pick)</h3>"
        f'<p class="text">{escape(ref.text)}</p><div>{"".join(boxes)}</div>'
        f'<p class="sum">total loss {ref.total_loss:.4f} | mean loss {ref.mean_loss:.4f} over {len(ref.tokens)} tokens</p></div>'
    )


def _nbest_block(nbest: list[Hypothesis]) -> str:
    items = "".join(f'<li><span class="score">{h.score:.4f}</span>{escape(h.translation)}</li>' for h in nbest)
    return f'<h3>n-best (score = sum of ln p / length^alpha)</h3><ol class="nbest">{items}</ol>'


def _sentence(index: int, result: Translation) -> str:
    columns = _tokens_block("translation", result.translation, result.tokens, result.total_loss, result.mean_loss)
    if result.reference is not None:
        columns += _reference_block(result.reference)
    nbest = _nbest_block(result.nbest) if result.nbest else ""
    return f'<section><h2>{index}. {escape(result.source)}</h2><div class="cols">{columns}</div>{nbest}</section>'


def render_html(results: list[Translation], title: str = "nmtkit translations") -> str:
    """The whole page as a string."""
    swatches = "".join(_box(f"{p:.1f}", p, f"prob {p:.1f}") for p in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0))
    body = "\n".join(_sentence(i, r) for i, r in enumerate(results, start=1))
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{_CSS}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n"
        f'<p class="legend">Token colour is its probability {swatches} Hover a token for its probability, loss (−ln p), '
        f"entropy and the top-k alternatives.</p>\n{body}\n</body>\n</html>\n"
    )


def write_html(path: str | Path, results: list[Translation], title: str = "nmtkit translations") -> Path:
    """Write the page to `path` (UTF-8), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the Python API translates text holding lone surrogates (undecodable input bytes under surrogateescape, which
    # decoding drops), which UTF-8 cannot hold: the page shows U+FFFD for them
    path.write_text(_SURROGATE.sub("\ufffd", render_html(results, title)), encoding="utf-8")
    return path
