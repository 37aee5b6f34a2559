"""Write a large synthetic parallel corpus by repeating the bundled training split with perturbations.

    python scripts/make_big_corpus.py /tmp/big/train.jsonl                 # 10,000,000 pairs, about 1.6 GB
    python scripts/make_big_corpus.py /tmp/big/train.jsonl --pairs 200000 --seed 3

It exists to test nmtkit at scale (memory, load and encode times), not to train a better model: the text
is the bundled Tatoeba split again and again. The output has the bundled schema, one record a line:
{"translation": {"en": ..., "zh": ...}, "attribution": ...}. Copy 0 is the bundled split as it is; every
later copy gets one edit of the English side (drop a word, swap two neighbouring words, or change a word's
case) and, half the time, one of the Chinese side (drop a character or swap two neighbouring ones), so the
copies are not exact duplicates. Pairs are written as they are made, so memory does not grow with --pairs,
and the same (source, pairs, seed) always gives the same file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "tatoeba-en-zh" / "train.jsonl"


def _drop_word(words: list[str], rng: random.Random) -> None:
    del words[rng.randrange(len(words))]


def _swap_words(words: list[str], rng: random.Random) -> None:
    i = rng.randrange(len(words) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]


def _change_case(words: list[str], rng: random.Random) -> None:
    i = rng.randrange(len(words))
    changed = [w for w in (words[i].lower(), words[i].upper(), words[i].title()) if w != words[i]]
    if changed:  # empty for a word without letters, such as "100"
        words[i] = rng.choice(changed)


def perturb_en(text: str, rng: random.Random) -> str:
    """One random word-level edit; a one-word sentence can only change case."""
    words = text.split(" ")
    edits: list[Callable[[list[str], random.Random], None]] = [_change_case]
    if len(words) >= 2:
        edits.append(_swap_words)
    if len(words) >= 3:  # keep at least two words
        edits.append(_drop_word)
    rng.choice(edits)(words, rng)
    return " ".join(words)


def perturb_zh(text: str, rng: random.Random) -> str:
    """Half the time, drop one character or swap two neighbours; the last one (usually 。？！) stays put."""
    body, last = text[:-1], text[-1:]
    if len(body) < 3 or rng.random() < 0.5:
        return text
    i = rng.randrange(len(body) - 1)
    if rng.random() < 0.5:
        return body[:i] + body[i + 1 :] + last
    return body[:i] + body[i + 1] + body[i] + body[i + 2 :] + last


def read_source(path: Path) -> list[dict]:
    """The records to repeat (the bundled split is 26,759 pairs, a few MB, so it is read whole)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                en, zh = record["translation"]["en"], record["translation"]["zh"]
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(
                    f"{path}:{line_no}: expected a JSON record with translation.en and translation.zh ({e!r});"
                    " pass --source a file in the HF translation schema"
                ) from None
            records.append({"en": en, "zh": zh, "attribution": record.get("attribution", "")})
    if not records:
        raise SystemExit(f"{path}: no records; pass --source a non-empty .jsonl file")
    return records


def big_corpus_lines(source: list[dict], n_pairs: int, seed: int) -> Iterator[str]:
    """`n_pairs` JSONL lines: copy k of `source` is unchanged for k = 0, perturbed for k >= 1."""
    rng = random.Random(seed)
    for i in range(n_pairs):
        copy, record = divmod(i, len(source))
        en, zh = source[record]["en"], source[record]["zh"]
        if copy:
            en, zh = perturb_en(en, rng), perturb_zh(zh, rng)
        pair = {"translation": {"en": en, "zh": zh}, "attribution": source[record]["attribution"]}
        yield json.dumps(pair, ensure_ascii=False) + "\n"


def write_big_corpus(out: Path, n_pairs: int, seed: int = 0, source: Path = BUNDLED) -> Path:
    """Stream `n_pairs` pairs to `out` (the parent folder is created); returns `out`."""
    records = read_source(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8", buffering=1 << 20) as f:
        f.writelines(big_corpus_lines(records, n_pairs, seed))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the .jsonl file to write (keep big ones outside the repository, e.g. /tmp)")
    parser.add_argument("--pairs", type=int, default=10_000_000, help="pairs to write (default: 10,000,000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default: 0)")
    parser.add_argument("--source", type=Path, default=BUNDLED, help=f"the corpus to repeat (default: {BUNDLED})")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be at least 1, got {args.pairs}")
    if not args.source.is_file():
        parser.error(f"--source: file not found: {args.source}")
    write_big_corpus(args.out, args.pairs, args.seed, args.source)
    print(f"wrote {args.pairs:,} pairs to {args.out} ({args.out.stat().st_size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
