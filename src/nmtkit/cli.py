"""The `nmtkit` command line: each subcommand parses its flags and calls library functions.

User errors (config, data, checkpoint, device) print one clear message and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .data import DataError
from .device import DeviceError
from .tokenizer import TokenizerError

log = logging.getLogger("nmtkit")
USER_ERRORS = (ConfigError, DataError, CheckpointError, TokenizerError, DeviceError)


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("nmtkit")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # datasets' own progress bars and notices would drown the training log
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Also write the log to a file (the run directory's train.log), and keep tqdm's bar intact."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("nmtkit")
    root.addHandler(handler)
    try:
        with logging_redirect_tqdm(loggers=[root]):
            yield
    finally:
        root.removeHandler(handler)
        handler.close()


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (defaults apply to anything it leaves out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one config value, e.g. --set train.lr=3e-4 (repeatable)")


def _add_runtime_args(p: argparse.ArgumentParser, precision: str = "fp32") -> None:
    p.add_argument("--checkpoint", required=True, help="run directory (uses its best checkpoint) or a .pt file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=precision, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=0, help="sentences per batch (default: decode.batch_size of the run)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmtkit", description="Train and inspect Transformer translation models.")
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    _add_config_args(p)

    p = sub.add_parser("tokenizer", help="train the SentencePiece tokenizer of a config and report its statistics")
    _add_config_args(p)

    p = sub.add_parser("translate", help="greedy translation, optionally with the per-token log")
    _add_runtime_args(p)
    p.add_argument("text", nargs="*", help="sentences to translate (default: one per line from --input or stdin)")
    p.add_argument("--input", "-i", help="file with one sentence per line ('-' for stdin)")
    p.add_argument("--reference", "-r", action="append", default=None, help="reference translation, scored with teacher forcing (one per sentence)")
    p.add_argument("--references", help="file with one reference per line, aligned with the input")
    p.add_argument("--show-tokens", action="store_true", help="print the per-token table")
    p.add_argument("--top-k", type=int, default=0, help="alternatives per token (default: decode.top_k of the run)")
    p.add_argument("--bits", action="store_true", help="also show entropy in bits")
    p.add_argument("--format", choices=["text", "jsonl"], default="text")

    p = sub.add_parser("evaluate", help="loss, perplexity, accuracy, BLEU and chrF on a held-out set")
    _add_runtime_args(p)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data", help="evaluate this file instead of a split of the run's config")
    p.add_argument("--limit", type=int, default=0, help="only the first N pairs")
    p.add_argument("--no-bleu", action="store_true", help="skip greedy decoding, BLEU and chrF")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args, argv)
    except USER_ERRORS as e:
        print(f"nmtkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nmtkit {args.command}: interrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    with _log_to_file(Path(cfg.train.run_dir) / "train.log"):
        result = train(cfg, argv)
    print(f"run {result.run_dir}: {result.stop_reason}; step {result.state.step}, best valid loss {result.state.best_valid_loss:.4f}")
    return 0


def cmd_tokenizer(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .tokenizer_report import tokenizer_command

    cfg = load_config(args.config, args.overrides)
    print(tokenizer_command(cfg))
    return 0


def cmd_translate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .show import format_translation
    from .translator import Translator

    texts = list(args.text) or _read_lines(args.input or "-", "--input")
    references = args.reference
    if args.references:
        references = _read_lines(args.references, "--references")
    if references is not None and len(references) != len(texts):
        raise ConfigError([f"--reference/--references: {len(references)} references for {len(texts)} sentences; give one per sentence"])
    translator = Translator.from_checkpoint(args.checkpoint, args.device, args.precision)
    if args.batch_size:
        translator.cfg.decode.batch_size = args.batch_size
    for result in translator.translate(texts, references, top_k=args.top_k or None):
        if args.format == "jsonl":
            print(json.dumps(result.to_json(), ensure_ascii=False))
        elif args.show_tokens or references is not None:
            print(format_translation(result, show_bits=args.bits, show_tokens=args.show_tokens))
        else:
            print(result.translation)
    return 0


def cmd_evaluate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .evaluate import evaluate_checkpoint, format_metrics

    result = evaluate_checkpoint(
        args.checkpoint, split=args.split, data_file=args.data, limit=args.limit, with_bleu=not args.no_bleu,
        device=args.device, precision=args.precision, batch_size=args.batch_size,
    )
    print(json.dumps(result, ensure_ascii=False, indent=None) if args.json else format_metrics(result))
    return 0


def _read_lines(path: str, flag: str) -> list[str]:
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin]
    try:
        with open(path, encoding="utf-8") as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        raise ConfigError([f"{flag}: file not found: {path}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{flag}: {path} is not UTF-8 text (byte {e.start})"]) from None


COMMANDS = {"train": cmd_train, "tokenizer": cmd_tokenizer, "translate": cmd_translate, "evaluate": cmd_evaluate}
