"""The typed configuration schema: every default lives here, in its field.

A YAML file and `--set section.key=value` overrides only change these dataclasses. Problems are
collected (unknown keys with a did-you-mean, wrong types, bad choices, out-of-range values) and
raised together as one `ConfigError`, so a user fixes a config in one pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """One or more problems in a config; `problems` lists them as 'path: message' strings."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        if len(problems) == 1 and not source:  # one bad flag or override: the problem is the whole message
            super().__init__(problems[0])
            return
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} config problem(s){where}:\n{lines}")


def _check(**limits: Any) -> dict[str, Any]:
    """Field metadata: numeric limits checked by `validate` (min, max, gt)."""
    return limits


@dataclass
class DataConfig:
    src_lang: str = "en"
    tgt_lang: str = "zh"
    # Local files (.jsonl/.json in the HF translation schema, .tsv/.csv with a column per
    # language, or a line-aligned pair written as "path/train.{lang}"), or split names
    # when `hub_name` is set.
    train: str = "data/tatoeba-en-zh/train.jsonl"
    valid: str = "data/tatoeba-en-zh/valid.jsonl"
    test: str = "data/tatoeba-en-zh/test.jsonl"
    hub_name: str = ""
    hub_config: str = ""
    max_len: int = field(default=128, metadata=_check(min=1))
    max_len_ratio: float = field(default=4.0, metadata=_check(min=1.0))
    cache_dir: str = ""  # "" = <run_dir>/cache


@dataclass
class TokenizerConfig:
    type: Literal["unigram", "bpe"] = "unigram"
    joint: bool = True
    vocab_size: int = field(default=8000, metadata=_check(min=16))
    src_vocab_size: int = field(default=0, metadata=_check(min=0))  # separate only; 0 = vocab_size
    character_coverage: float = field(default=0.9995, metadata=_check(gt=0.0, max=1.0))
    # "identity" keeps text as is (full-width Chinese punctuation survives the round trip, so
    # outputs match references); "nmt_nfkc" is SentencePiece's own default.
    normalization: Literal["identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"] = "identity"
    # sentences each SentencePiece model trains on, from a random sample of pairs when data.train has more;
    # 0 = all of them. SentencePiece holds its input in memory (~0.5 GB per million short sentences).
    max_sentences: int = field(default=1_000_000, metadata=_check(min=0))


@dataclass
class ModelConfig:
    d_model: int = field(default=512, metadata=_check(min=8))
    n_heads: int = field(default=8, metadata=_check(min=1))
    d_ff: int = field(default=2048, metadata=_check(min=1))
    n_enc_layers: int = field(default=6, metadata=_check(min=1))
    n_dec_layers: int = field(default=6, metadata=_check(min=1))
    dropout: float = field(default=0.1, metadata=_check(min=0.0, max=0.99))
    # on the attention weights and on the FFN's inner activations; both default to 0 (as is common
    # in NMT toolkits) because their masks are large and cost time, on CPU especially
    attention_dropout: float = field(default=0.0, metadata=_check(min=0.0, max=0.99))
    activation_dropout: float = field(default=0.0, metadata=_check(min=0.0, max=0.99))
    norm: Literal["pre", "post"] = "pre"
    activation: Literal["relu", "gelu"] = "relu"
    tie_embeddings: bool = True
    max_positions: int = field(default=1024, metadata=_check(min=8))


@dataclass
class TrainConfig:
    run_dir: str = "checkpoints/run"
    seed: int = field(default=1, metadata=_check(min=0, max=2**32 - 1))  # numpy's seed range
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    threads: int = field(default=0, metadata=_check(min=0))  # CPU threads; 0 = torch default
    max_tokens: int = field(default=4096, metadata=_check(min=16))
    # what max_tokens counts per pair: its longer side (bounds the memory of every batch) or, as
    # Hugging Face scripts do, its target side only (bigger steps when sources are longer than targets)
    max_tokens_counts: Literal["longer_side", "target"] = "longer_side"
    accum_steps: int = field(default=1, metadata=_check(min=1))
    lr: float = field(default=5e-4, metadata=_check(gt=0.0, max=10.0))
    schedule: Literal["inverse_sqrt", "cosine", "constant"] = "inverse_sqrt"
    warmup_steps: int = field(default=4000, metadata=_check(min=0))
    min_lr: float = field(default=0.0, metadata=_check(min=0.0))
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = field(default=1e-9, metadata=_check(gt=0.0))
    weight_decay: float = field(default=0.0, metadata=_check(min=0.0))
    label_smoothing: float = field(default=0.1, metadata=_check(min=0.0, max=0.99))
    clip_norm: float = field(default=1.0, metadata=_check(min=0.0))  # 0 = no clipping
    max_steps: int = field(default=0, metadata=_check(min=0))  # 0 = no step limit
    max_epochs: int = field(default=0, metadata=_check(min=0))  # 0 = no epoch limit
    max_minutes: float = field(default=0.0, metadata=_check(min=0.0))  # 0 = no time limit
    patience: int = field(default=0, metadata=_check(min=0))  # evals without improvement; 0 = off
    eval_every: int = field(default=500, metadata=_check(min=1))
    save_every: int = field(default=500, metadata=_check(min=1))
    log_every: int = field(default=100, metadata=_check(min=1))
    keep_checkpoints: int = field(default=3, metadata=_check(min=1))
    # skip an update whose gradient is not finite (on the device; the host reads the flag a step later),
    # and stop after max_bad_steps such steps in a row (fp16: its grad scaler skips them, halving its scale each time;
    # they count once the scale is 1 or less)
    skip_nonfinite: bool = True
    max_bad_steps: int = field(default=10, metadata=_check(min=1))
    # a batch that runs out of memory is logged and skipped (single process); false re-raises
    skip_oom_batches: bool = True
    # a tqdm bar on stderr, when stderr is a terminal (a redirected stderr gets the log lines only)
    progress_bar: bool = True
    # torch.compile the encoder-decoder for training, after a compilation of a minute or two at the start
    # (meant for GPUs; on the 2-core CPU of docs/performance.md it measured 16% slower than eager)
    compile: bool = False
    # how training and scoring compute attention (no effect on the weights): `auto` is SDPA's fused kernels on GPUs
    # and two matmuls with a softmax on CPU (model.attention); `matmul` on a GPU lets `compile` fuse the softmax with
    # its neighbours instead of calling SDPA's kernels, which are slow at sentence lengths (docs/performance.md)
    attention_kernel: Literal["auto", "sdpa", "matmul"] = "auto"
    # mirror metrics.jsonl to TensorBoard event files in RUN_DIR/tensorboard (needs `pip install tensorboard`)
    tensorboard: bool = False
    # fine-tuning: a checkpoint (file or run directory) whose weights and tokenizer start this run (init_from.py)
    init_from: str = ""


@dataclass
class DecodeConfig:
    batch_size: int = field(default=64, metadata=_check(min=1))
    max_len_a: float = field(default=1.5, metadata=_check(min=0.0))  # max new tokens = a * src_len + b (src_len: pieces + EOS)
    max_len_b: int = field(default=10, metadata=_check(min=1))
    top_k: int = field(default=5, metadata=_check(min=1))
    workers: int = field(default=0, metadata=_check(min=0))  # batches decoded at once on CPU (0 = one per thread, up to 8)
    processes: bool = True  # CPU workers are forked processes on Linux (no shared GIL); false: threads of this process
    cuda_graphs: bool = True  # on CUDA, capture a greedy decoding step once per batch as a CUDA graph and replay it


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- conversion


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "a list of " + ", ".join(_describe_type(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to the field type `tp`, or raise ValueError naming path and value."""
    bad = ValueError(f"{path}: got {value!r}, expected {_describe_type(tp)}")
    if typing.get_origin(tp) is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            number = float(value)  # an int beyond float's range (1e309 written out in digits) raises OverflowError
        except OverflowError:
            raise bad from None
        if not math.isfinite(number):
            raise bad
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes/on/off as a boolean
            raise ValueError(f"{path}: got {value!r}, expected a string; YAML reads unquoted no, yes, on and off as"
                             " true or false, so quote the value (e.g. 'no' for Norwegian)")
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"unsupported config type {tp} at {path}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_limits(f: dataclasses.Field, value: Any, path: str) -> str | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lim = f.metadata
    if "min" in lim and value < lim["min"]:
        return f"{path}: got {value!r}, must be >= {lim['min']}"
    if "gt" in lim and value <= lim["gt"]:
        return f"{path}: got {value!r}, must be > {lim['gt']}"
    if "max" in lim and value > lim["max"]:
        return f"{path}: got {value!r}, must be <= {lim['max']}"
    return None


def _unknown_key(key: Any, valid: list[str], path: str) -> str:
    name = f"{path}.{key}" if path else str(key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    elsewhere = [s for s in _section_names() if path and s != path and _field_type([s, str(key)]) is not None]
    if elsewhere:  # a key of another section, e.g. train.dropout for model.dropout
        hint = f" (it belongs in another section: {' or '.join(f'{s}.{key}' for s in elsewhere)})"
    else:
        hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{name}: unknown key{hint}; valid keys: {', '.join(valid)}"


def _apply_section(obj: Any, values: Any, path: str, problems: list[str]) -> None:
    if not isinstance(values, dict):
        problems.append(f"{path}: expected a mapping of keys, got {values!r}")
        return
    types = _field_types(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in fields:
            problems.append(_unknown_key(key, list(fields), path))
            continue
        try:
            setattr(obj, key, _coerce(value, types[key], f"{path}.{key}"))
        except ValueError as e:
            problems.append(str(e))


def _apply(cfg: Config, tree: Any, problems: list[str]) -> None:
    if tree is None:
        return
    if not isinstance(tree, dict):
        problems.append(f"top level: expected a mapping with sections {_section_names()}, got {type(tree).__name__}")
        return
    for section, values in tree.items():
        if section not in _section_names():
            problems.append(_unknown_key(section, _section_names(), ""))
            continue
        if values is not None:
            _apply_section(getattr(cfg, section), values, section, problems)


def _section_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _validate(cfg: Config, problems: list[str]) -> None:
    """Range checks from field metadata, then the rules that relate two fields."""
    for section in _section_names():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            msg = _check_limits(f, getattr(obj, f.name), f"{section}.{f.name}")
            if msg:
                problems.append(msg)
    m = cfg.model
    if m.n_heads >= 1 and m.d_model % m.n_heads:
        problems.append(f"model.d_model: {m.d_model} is not divisible by model.n_heads={m.n_heads}")
    elif m.n_heads >= 1 and (m.d_model // m.n_heads) % 2:
        problems.append(f"model.d_model / model.n_heads = {m.d_model // m.n_heads} must be even")
    if not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        problems.append(f"train.betas: got {list(cfg.train.betas)}, each must be in [0, 1) (AdamW's moment decay rates)")
    if cfg.train.min_lr > cfg.train.lr:
        problems.append(f"train.min_lr: {cfg.train.min_lr} is above train.lr={cfg.train.lr}; the schedule decays from lr to min_lr")
    if cfg.train.schedule == "cosine" and cfg.train.max_steps == 0:
        problems.append("train.schedule: 'cosine' decays to train.min_lr at train.max_steps; set train.max_steps > 0")
    if cfg.data.src_lang == cfg.data.tgt_lang:
        problems.append(f"data.tgt_lang: {cfg.data.tgt_lang!r} equals data.src_lang; use two different language keys")
    if cfg.train.max_tokens < cfg.data.max_len + 1:
        problems.append(
            f"train.max_tokens: {cfg.train.max_tokens} is smaller than data.max_len + 1 = {cfg.data.max_len + 1} (EOS or"
            " BOS included); the longest kept sentence would not fit in a batch"
        )


# ----------------------------------------------------------------------------- public API


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `3e-4` (no dot) is a string; read it as the float it means (YAML 1.2). Keys are
    unique: PyYAML would keep the last of two `train:` sections and drop the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`, expanded by the constructor below
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                is_repeat = key in seen  # as a dict sees it: true and 1 are one key there too
            except TypeError:  # an unhashable key: the constructor below reports it
                continue
            if is_repeat:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one mapping; merge the two", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """Quotes strings that `_Loader` would read as numbers (a hub config named 1e5), so a dumped config reloads as itself."""


for _yaml_class in (_Loader, _Dumper):  # the same float rule for reading and writing
    _yaml_class.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
    )


def _safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: builds plain values only


def _field_type(keys: list[str]) -> Any:
    """The schema type at section.key, or None when the path is not in the schema."""
    if len(keys) != 2 or keys[0] not in _section_names():
        return None
    return _field_types(type(getattr(Config(), keys[0]))).get(keys[1])


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4): the value parsed as YAML, or kept as text for string fields."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4"])
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if _field_type(keys) is str:  # typed by the schema: data.src_lang=no is the string 'no', not false
        return keys, raw.strip()
    try:
        value = _safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except (ValueError, RecursionError) as e:  # YAML that parses but can't be built, e.g. a date 2001-02-30
        raise ConfigError([f"--set {text!r}: the value can't be read ({e})"]) from None
    return keys, value


def _tree_from_overrides(overrides: list[str], problems: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if len(keys) != 2:
            problems.append(f"--set {text!r}: expected exactly section.key, e.g. train.lr=3e-4")
            continue
        section = tree.setdefault(keys[0], {})
        if isinstance(section, dict):
            section[keys[1]] = value
    return tree


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        return _safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"invalid YAML{where}: {getattr(e, 'problem', e)}"], str(path)) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start}): {e.reason}"], str(path)) from None
    except (ValueError, RecursionError) as e:  # parses, but a value can't be built (a bad date, !!int abc, deep nesting)
        raise ConfigError([f"a value in this YAML can't be read: {str(e)[:200]}"], str(path)) from None


def config_from_tree(tree: Any, overrides: list[str] | None = None, source: str = "") -> Config:
    """Build a validated Config from a YAML-like tree plus `section.key=value` overrides."""
    cfg = Config()
    problems: list[str] = []
    _apply(cfg, tree, problems)
    _apply(cfg, _tree_from_overrides(overrides or [], problems), problems)
    _expand_home(cfg)
    _validate(cfg, problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


_PATH_KEYS = (("data", "train"), ("data", "valid"), ("data", "test"), ("data", "cache_dir"), ("train", "run_dir"), ("train", "init_from"))


def _expand_home(cfg: Config) -> None:
    """`~/runs/x` means the home folder, as in a shell (the YAML file is not read by one)."""
    for section, key in _PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value.startswith("~"):
            setattr(getattr(cfg, section), key, os.path.expanduser(value))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    tree = read_yaml(path) if path is not None else None
    return config_from_tree(tree, overrides, str(path or ""))


def dump_config(cfg: Config) -> str:
    tree = cfg.to_dict()
    tree["train"]["betas"] = list(cfg.train.betas)
    return yaml.dump(tree, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
