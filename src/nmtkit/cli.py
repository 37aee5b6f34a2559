"""The `nmtkit` command line: each subcommand parses its flags and calls library functions.

User errors (config, data, checkpoint, device, plotting) print one clear message and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .cpu_matmul import MatmulChoiceError
from .data import DataError
from .device import DeviceError
from .metrics import TensorBoardMissingError
from .plot import PlotError
from .run_lock import RunLockedError
from .tokenizer import TokenizerError

if TYPE_CHECKING:
    from .records import Translation

log = logging.getLogger("nmtkit")
USER_ERRORS = (
    ConfigError, DataError, CheckpointError, TokenizerError, DeviceError, MatmulChoiceError, RunLockedError, PlotError, TensorBoardMissingError,
)


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


class _RunLogHandler(logging.FileHandler):
    """A log file created with its folder at the first line: a run refused before it logs anything (a bad setting,
    no GPU) leaves no run directory behind."""

    def _open(self) -> io.TextIOWrapper:
        try:
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # a run directory that can't be made: the run stops at its lock, with a message naming it
            return open(os.devnull, "w", encoding="utf-8")
        try:
            return super()._open()
        except OSError as e:
            print(f"nmtkit: warning: cannot write {self.baseFilename} ({e}); the log goes to the terminal only", file=sys.stderr)
            return open(os.devnull, "w", encoding="utf-8")


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Also write the log to a file (the run directory's train.log), and keep tqdm's bar intact."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = _RunLogHandler(path, encoding="utf-8", delay=True)
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
    p.add_argument(
        "--precision", default=precision, choices=["auto", "fp32", "bf16", "fp16"],
        help="default %(default)s: full-precision probabilities; auto: bf16 on GPUs and on CPUs with native bf16 (faster)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=None, help="sentences per batch (default: decode.batch_size of the run)")
    p.add_argument(
        "--workers", type=_non_negative_int, default=None, metavar="N",
        help="batches decoded at once on CPU, one per core (default: decode.workers of the run; 0 = one per CPU thread, up to 8)",
    )
    p.add_argument("--max-len-a", type=_non_negative_float, default=None, metavar="A",
                   help="output length budget A * source length + B, </s> included (default: decode.max_len_a of the run)")
    p.add_argument("--max-len-b", type=_positive_int, default=None, metavar="B", help="(default: decode.max_len_b of the run)")


def _finite_float(text: str) -> float:
    """An argparse type for a finite number: a NaN length penalty sorts every beam hypothesis first."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type for whole numbers >= minimum, whose error names the value (a negative --batch-size or
    --top-k otherwise fails deep inside decoding)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


_non_negative_int, _positive_int = _whole_number(0), _whole_number(1)


def _add_run_dir_commands(sub: argparse._SubParsersAction) -> None:
    """The subcommands that work on a finished (or running) run directory."""
    p = sub.add_parser("plot", help="draw a run's training curves (loss by step and by tokens, learning rate) into a PNG")
    p.add_argument("run_dir", help="the run directory (reads its metrics.jsonl)")
    p.add_argument("--out", "-o", help="PNG file to write (default RUN_DIR/curves.png)")

    p = sub.add_parser("average", help="average the weights of a run's newest step checkpoints into one checkpoint")
    p.add_argument("run_dir", help="the run directory (reads RUN_DIR/checkpoints/step-*.pt)")
    p.add_argument("--last", type=_positive_int, default=None, metavar="N",
                   help="how many of the newest step checkpoints to average (default: all the run kept, up to 5)")
    p.add_argument("--out", "-o", help="checkpoint file to write (default RUN_DIR/checkpoints/averaged.pt)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nmtkit", description="Train and inspect Transformer translation models.")
    parser.add_argument("--verbose", "-v", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    _add_config_args(p)

    p = sub.add_parser("tokenizer", help="train the SentencePiece tokenizer of a config and report its statistics")
    _add_config_args(p)

    p = sub.add_parser("translate", help="greedy or beam-search translation, optionally with the per-token log or an HTML view")
    _add_runtime_args(p)
    p.add_argument("text", nargs="*", help="sentences to translate (default: one per line from --input or stdin)")
    p.add_argument("--input", "-i", help="file with one sentence per line ('-' for stdin)")
    p.add_argument("--reference", "-r", action="append", default=None, help="reference translation, scored with teacher forcing (one per sentence)")
    p.add_argument("--references", help="file with one reference per line, aligned with the input")
    p.add_argument("--show-tokens", action="store_true", help="print the per-token table")
    p.add_argument("--top-k", type=_positive_int, default=None, help="alternatives per token (default: decode.top_k of the run)")
    p.add_argument("--bits", action="store_true", help="the per-token table with entropy in bits too (implies --show-tokens)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text")
    p.add_argument("--beam", type=_positive_int, default=1, metavar="K", help="beam size (default 1: greedy decoding)")
    p.add_argument("--nbest", type=_positive_int, default=1, metavar="N", help="also list the N best hypotheses with their scores (N <= --beam)")
    p.add_argument("--length-penalty", type=_finite_float, default=1.0, metavar="ALPHA", help="beam score = sum of ln p / length^ALPHA (default 1.0; 0 = raw sum)")
    p.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with tokens coloured by probability")

    p = sub.add_parser("evaluate", help="loss, perplexity, accuracy, calibration, BLEU and chrF on a held-out set")
    _add_runtime_args(p)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data", help="evaluate this file instead of a split of the run's config")
    p.add_argument("--limit", type=_non_negative_int, default=0, help="only the first N pairs")
    p.add_argument("--no-bleu", action="store_true", help="skip greedy decoding, BLEU and chrF")
    p.add_argument("--beam", type=_positive_int, default=1, help="beam size for the BLEU/chrF translations (default: greedy)")
    p.add_argument("--length-penalty", type=_finite_float, default=1.0, help="beam scores are log-probability / length^this")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="DIR", help="also draw the reliability diagram into DIR/reliability.png (needs matplotlib)")

    _add_run_dir_commands(sub)

    p = sub.add_parser("benchmark", help="time the real training step and greedy decoder on fixed work")
    _add_config_args(p)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: train.device of the config")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="default: train.precision of the config")
    p.add_argument("--steps", type=_positive_int, default=30, help="timed training steps per run")
    p.add_argument("--repeats", type=_positive_int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--eos", action="store_true", help="decoding stops at EOS (default: exactly 48 new tokens)")
    p.add_argument("--checkpoint", help="decode with these trained weights (useful with --eos)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="decoding batch size (default: decode.batch_size of the config, 64 in the bench configs)")
    p.add_argument("--sentences", type=_positive_int, default=512, help="test sentences to decode")
    p.add_argument("--no-train", action="store_true", help="skip the training measurement")
    p.add_argument("--no-decode", action="store_true", help="skip the decoding measurement")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--profile", metavar="FILE", help="after the timed runs, profile 5 training steps and write the costliest ops to FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    _setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args, argv)
    except USER_ERRORS as e:
        print(f"nmtkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nmtkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head -1`): stop quietly, as `cat` does
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):  # stdout may be no real file
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush of stdout must not fail again
            os.close(devnull)
        return 141


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parser's arguments, where `translate` takes its sentences between options too: in `--reference R1 S1
    --reference R2 S2`, argparse gives the positional sentences only their first run (S1) and refuses S2. Later runs
    come back as leftovers, in order, and join the first; a leftover option is refused as parse_args refuses it."""
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "translate":
        # what argparse takes for an option: a dash first, no space (a sentence such as "- an item" is text); after
        # a `--`, everything is text
        cut = extra.index("--") if "--" in extra else len(extra)
        if not any(x.startswith("-") and x != "-" and " " not in x for x in extra[:cut]):
            args.text, extra = [*args.text, *extra[:cut], *extra[cut + 1 :]], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def cmd_train(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .step import DivergenceError
    from .train import train

    cfg = load_config(args.config, args.overrides)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone writes train.log
    log_file = _log_to_file(Path(cfg.train.run_dir) / "train.log") if is_main else contextlib.nullcontext()
    with log_file:
        try:
            result = train(cfg, argv)
        except DivergenceError as e:
            print(f"nmtkit train: error: {e}", file=sys.stderr)
            return 1
    if is_main:  # the other ranks never validate: their best loss is always inf
        print(f"run {result.run_dir}: {result.stop_reason}; step {result.state.step}, best valid loss {result.state.best_valid_loss:.4f}")
    return 0


def cmd_tokenizer(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .tokenizer_report import tokenizer_command

    cfg = load_config(args.config, args.overrides)
    print(tokenizer_command(cfg))
    return 0


def decode_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The decode settings given on the command line, to put in place of the run's."""
    return {key: getattr(args, key) for key in ("batch_size", "workers", "max_len_a", "max_len_b") if getattr(args, key) is not None}


def _check_beam(args: argparse.Namespace, vocab_size: int | None) -> None:
    from .beam import check_beam_settings

    try:
        check_beam_settings(args.beam, args.nbest, vocab_size)
    except ValueError as e:
        raise ConfigError([f"--beam {args.beam} --nbest {args.nbest}: {e}"]) from None


def cmd_translate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .html_view import write_html
    from .text_input import check_writable, checked_arguments, chunked, read_lines, stdin_chunks
    from .translator import Translator

    if args.text and args.input:
        raise ConfigError(["sentences on the command line and --input: give one or the other"])
    if args.reference is not None and args.references:
        raise ConfigError(["--reference and --references: give one or the other"])
    if args.references == "-" and not args.text and args.input in (None, "-"):
        raise ConfigError(["--references -: stdin can't hold both the sentences and their references; give one as a file"])
    references = checked_arguments(args.reference, "--reference") if args.reference is not None else None
    if args.references:
        references = read_lines(args.references, "--references")
    # sentences read whole now, or from stdin as they arrive (None); references pair with the whole input, so with
    # them stdin is read whole too
    texts = checked_arguments(args.text, "sentence") or None
    if texts is None and (args.input not in (None, "-") or references is not None):
        texts = read_lines(args.input or "-", "--input")
    if args.html:
        check_writable(args.html, "--html")  # before the decoding, not after it
    if texts is not None and references is not None and len(references) != len(texts):  # before loading a model
        raise ConfigError([f"--reference/--references: {len(references)} references for {len(texts)} sentences; give one per sentence"])
    _check_beam(args, vocab_size=None)  # what needs no model, before loading one
    translator = Translator.from_checkpoint(args.checkpoint, args.device, args.precision)
    _check_beam(args, vocab_size=translator.tokenizer.tgt_vocab_size)
    translator.cfg.decode = dataclasses.replace(translator.cfg.decode, **decode_overrides(args))
    # Translated and printed a chunk at a time: stdin's lines as they arrive, a file's in chunks of 64 rounds of
    # batches, each sorted by length (a stopped run keeps what it printed).
    chunk = translator.cfg.decode.batch_size * translator.workers * 64
    chunks = chunked(texts, chunk) if texts is not None else stdin_chunks(chunk)
    results, done = [], 0
    for part in chunks:
        part_references = references[done : done + len(part)] if references is not None else None
        done += len(part)
        translations = translator.translate(
            part, part_references, top_k=args.top_k, beam_size=args.beam, nbest=args.nbest, length_penalty=args.length_penalty
        )
        for result in translations:
            print(_shown(result, args, with_table=args.show_tokens or args.bits or references is not None or args.nbest > 1))
        sys.stdout.flush()
        if args.html:  # kept for the page only
            results += translations
    if args.html:
        try:
            log.info("wrote %s", write_html(args.html, results))
        except OSError as e:
            raise ConfigError([f"--html: cannot write {args.html} ({e.strerror or e})"]) from None
    return 0


def _shown(result: Translation, args: argparse.Namespace, with_table: bool) -> str:
    """One translation as `translate` prints it: a JSON line, the token table, or the text alone."""
    from .show import format_translation

    if args.format == "jsonl":
        return json.dumps(result.to_json(), ensure_ascii=False)
    if with_table:
        return format_translation(result, show_bits=args.bits, show_tokens=args.show_tokens or args.bits)
    return result.translation


def cmd_evaluate(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .evaluate import evaluate_checkpoint, format_metrics

    result = evaluate_checkpoint(
        args.checkpoint, split=args.split, data_file=args.data, limit=args.limit, with_bleu=not args.no_bleu,
        device=args.device, precision=args.precision, decode=decode_overrides(args), plot_dir=args.plot,
        beam_size=args.beam, length_penalty=args.length_penalty,
    )
    print(json.dumps(result, ensure_ascii=False, indent=None) if args.json else format_metrics(result))
    return 0


def cmd_plot(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .plot import plot_training_curves

    print(plot_training_curves(args.run_dir, args.out))
    return 0


def cmd_average(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .average import average_checkpoints

    result = average_checkpoints(args.run_dir, args.last, args.out)
    print(f"averaged steps {', '.join(map(str, result.steps))} -> {result.path}")
    return 0


def cmd_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .benchmark import BenchmarkSettings, format_benchmark, run_benchmark

    cfg = load_config(args.config, args.overrides)
    settings = BenchmarkSettings(
        device=args.device or cfg.train.device, precision=args.precision or cfg.train.precision,
        timed_steps=args.steps, repeats=args.repeats,
        n_sentences=args.sentences, batch_size=args.batch_size or cfg.decode.batch_size, top_k=cfg.decode.top_k, stop_at_eos=args.eos,
        train=not args.no_train, decode=not args.no_decode, profile=args.profile,
    )
    result = run_benchmark(cfg, settings, args.checkpoint)
    print(json.dumps(result) if args.json else format_benchmark(result))
    return 0


COMMANDS = {
    "train": cmd_train,
    "tokenizer": cmd_tokenizer,
    "translate": cmd_translate,
    "evaluate": cmd_evaluate,
    "benchmark": cmd_benchmark,
    "plot": cmd_plot,
    "average": cmd_average,
}
