"""The config schema: shipped configs load and document themselves, every kind of mistake is reported
with its dotted path and a fix, all at once, and a dumped config reads back to the same Config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_tree
from nmtkit.config import Config, ConfigError, config_from_tree, dump_config, load_config

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def problems_of(tree: object = None, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_tree(tree, overrides)
    return info.value.problems


def only_problem(tree: object = None, overrides: list[str] | None = None) -> str:
    problems = problems_of(tree, overrides)
    assert len(problems) == 1, problems
    return problems[0]


# ----------------------------------------------------------------------------- shipped configs


def test_configs_are_shipped() -> None:
    assert SHIPPED, "configs/*.yaml is empty"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_header_gives_its_launch_command(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("#"), f"{path.name} must start with a comment"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert any(("nmtkit " in line and "--config" in line) or "torchrun" in line for line in header), header


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_comments_every_setting(path: Path) -> None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        is_section = bool(re.fullmatch(r"\w+:\s*", line))  # `train:` opens a section; its keys carry the comments
        if line.strip() and not line.lstrip().startswith("#") and not is_section:
            assert " #" in line, f"{path.name}, line {number} has no comment: {line!r}"


def test_no_config_file_gives_the_defaults() -> None:
    assert load_config(None) == Config()


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_key_suggests_the_closest_valid_key() -> None:
    message = only_problem({"train": {"lrr": 1}})
    assert "train.lrr" in message and "did you mean 'lr'" in message


def test_unknown_section_suggests_the_closest_section() -> None:
    message = only_problem({"trian": {"lr": 1}})
    assert "trian" in message and "did you mean 'train'" in message


def test_section_that_is_not_a_mapping_is_reported() -> None:
    assert "model" in only_problem({"model": 5})


# ----------------------------------------------------------------------------- bad values


def test_wrong_type_names_path_value_and_expected_type() -> None:
    message = only_problem({"model": {"d_model": "big"}})
    assert "model.d_model" in message and "'big'" in message and "integer" in message


def test_bad_choice_lists_the_valid_options() -> None:
    message = only_problem({"model": {"norm": "middle"}})
    assert "model.norm" in message and "'middle'" in message
    assert "'pre'" in message and "'post'" in message


def test_negative_number_names_the_limit() -> None:
    message = only_problem({"train": {"warmup_steps": -1}})
    assert "train.warmup_steps" in message and "-1" in message and ">= 0" in message


def test_number_above_its_maximum_names_the_limit() -> None:
    message = only_problem({"model": {"dropout": 1.5}})
    assert "model.dropout" in message and "<= 0.99" in message


@pytest.mark.parametrize("value", [True, False])
def test_bools_are_not_accepted_as_integers(value: bool) -> None:
    assert "model.d_model" in only_problem({"model": {"d_model": value}})


def test_bools_are_not_accepted_as_floats() -> None:
    assert "train.lr" in only_problem({"train": {"lr": True}})


def test_an_integer_beyond_floats_range_is_a_config_error_not_a_crash() -> None:
    assert "train.max_minutes" in only_problem({"train": {"max_minutes": 10**320}})


def test_max_tokens_of_max_len_plus_one_fits_the_longest_pair() -> None:
    """A pair's counted width is its longer side plus one (EOS or BOS)."""
    assert config_from_tree({"train": {"max_tokens": 65}, "data": {"max_len": 64}}).train.max_tokens == 65
    assert "data.max_len + 1 = 65" in only_problem({"train": {"max_tokens": 64}, "data": {"max_len": 64}})


def test_integers_are_accepted_as_floats() -> None:
    assert config_from_tree({"train": {"lr": 1}}).train.lr == 1.0


def test_exponent_without_a_dot_reads_as_a_float(tmp_path: Path) -> None:
    # YAML 1.1 (PyYAML's default) reads `3e-4` as a string; a learning rate is always written this way.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  eps: 1E-8\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.eps == pytest.approx(1e-8)


def test_all_problems_are_reported_at_once() -> None:
    tree = {"train": {"lrr": 1, "warmup_steps": -5}, "model": {"norm": "middle"}}
    with pytest.raises(ConfigError) as info:
        config_from_tree(tree)
    problems = info.value.problems
    assert len(problems) == 3
    for path in ("train.lrr", "train.warmup_steps", "model.norm"):
        assert sum(path in p for p in problems) == 1, problems
        assert path in str(info.value)


# ----------------------------------------------------------------------------- --set overrides


def test_override_float_is_typed_by_the_schema() -> None:
    lr = config_from_tree(None, ["train.lr=3e-4"]).train.lr
    assert isinstance(lr, float) and lr == pytest.approx(3e-4)


def test_override_int_is_typed_by_the_schema() -> None:
    steps = config_from_tree(None, ["train.max_steps=10"]).train.max_steps
    assert type(steps) is int and steps == 10


def test_override_bool_is_typed_by_the_schema() -> None:
    assert config_from_tree(None, ["tokenizer.joint=false"]).tokenizer.joint is False


def test_override_string_keeps_the_text_as_written() -> None:
    # `no` (Norwegian) and `123` would be a bool and an int in YAML; the schema says string.
    cfg = config_from_tree(None, ["data.src_lang=no", "train.run_dir=123"])
    assert (cfg.data.src_lang, cfg.train.run_dir) == ("no", "123")


def test_override_tuple_reads_a_yaml_list() -> None:
    assert config_from_tree(None, ["train.betas=[0.9, 0.99]"]).train.betas == (0.9, 0.99)


def test_override_wins_over_the_tree() -> None:
    cfg = config_from_tree({"train": {"max_steps": 5}}, ["train.max_steps=7"])
    assert cfg.train.max_steps == 7


@pytest.mark.parametrize("text", ["train.lr", "lr=3e-4", "train.lr.x=1"])
def test_bad_override_syntax_is_a_config_error(text: str) -> None:
    message = only_problem(None, [text])
    assert text in message and "section.key" in message


def test_override_of_unknown_key_suggests_the_closest_key() -> None:
    message = only_problem(None, ["train.lrr=1"])
    assert "train.lrr" in message and "did you mean 'lr'" in message


def test_override_with_a_bad_value_names_the_path() -> None:
    message = only_problem(None, ["model.d_model=big"])
    assert "model.d_model" in message and "'big'" in message


# ----------------------------------------------------------------------------- files


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.1\n  max_steps: [1, 2\nmodel:\n  d_model: 8\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line " in str(info.value) and str(path) in str(info.value)


def test_missing_config_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_empty_config_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")
    assert load_config(path) == Config()


# ----------------------------------------------------------------------------- rules across fields


def test_d_model_must_divide_by_n_heads() -> None:
    message = only_problem({"model": {"d_model": 30, "n_heads": 4}})
    assert "model.d_model" in message and "model.n_heads" in message


def test_cosine_schedule_needs_max_steps() -> None:
    message = only_problem({"train": {"schedule": "cosine"}})
    assert "train.schedule" in message and "train.max_steps" in message
    assert config_from_tree({"train": {"schedule": "cosine", "max_steps": 100}}).train.schedule == "cosine"


def test_source_and_target_languages_must_differ() -> None:
    message = only_problem({"data": {"src_lang": "en", "tgt_lang": "en"}})
    assert "data.tgt_lang" in message and "data.src_lang" in message


def test_batch_budget_must_fit_the_longest_sentence() -> None:
    message = only_problem({"train": {"max_tokens": 100}, "data": {"max_len": 128}})
    assert "train.max_tokens" in message and "data.max_len" in message


def test_adamw_betas_seed_and_min_lr_are_checked_before_training() -> None:
    for tree, expected in [
        ({"train": {"betas": [1.5, 0.98]}}, "train.betas: got [1.5, 0.98], each must be in [0, 1)"),
        ({"train": {"seed": -1}}, "train.seed: got -1, must be >= 0"),
        ({"train": {"seed": 2**32}}, "train.seed: got 4294967296, must be <= 4294967295"),
        ({"train": {"min_lr": 1.0, "lr": 5e-4}}, "train.min_lr: 1.0 is above train.lr=0.0005"),
    ]:
        assert expected in only_problem(tree)


def test_key_of_another_section_names_where_it_belongs() -> None:
    assert "train.dropout: unknown key (it belongs in another section: model.dropout)" in only_problem({"train": {"dropout": 0.2}})


def test_unquoted_no_for_a_language_says_to_quote_it(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` (Norwegian) as false."""
    path = tmp_path / "nb.yaml"
    path.write_text("data:\n  tgt_lang: no\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.tgt_lang: got False, expected a string; .* quote the value"):
        load_config(path)


def test_a_section_given_twice_is_an_error_not_a_silent_merge(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 3.0e-4\n  max_steps: 100\ntrain:\n  run_dir: x\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 4, column 1: the key 'train' appears twice in one mapping"):
        load_config(path)
    path.write_text("train:\n  lr: 3.0e-4\n  lr: 1.0e-3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 3, column 3: the key 'lr' appears twice"):
        load_config(path)
    # a merge key is not a repeat, and a key may override one it merges
    path.write_text("train:\n  <<: {lr: 1.0e-3, seed: 7}\n  lr: 3.0e-4\n", encoding="utf-8")
    assert (load_config(path).train.lr, load_config(path).train.seed) == (3e-4, 7)


def test_paths_starting_with_a_tilde_mean_the_home_folder(monkeypatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = config_from_tree({"train": {"run_dir": "~/runs/x"}, "data": {"train": "~/data/train.jsonl"}})
    assert (cfg.train.run_dir, cfg.data.train) == ("/home/someone/runs/x", "/home/someone/data/train.jsonl")


# ----------------------------------------------------------------------------- round trip


def test_a_string_that_reads_like_a_number_is_dumped_quoted(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.hub_config = "1e5"  # a hub corpus's configuration name
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_dumped_config_reads_back_equal(tmp_path: Path) -> None:
    tree = tiny_tree(
        {"train": tmp_path / "t.jsonl", "valid": tmp_path / "v.jsonl", "test": tmp_path / "x.jsonl"},
        tmp_path / "run",
        train={"betas": [0.8, 0.95], "lr": 3e-4, "eps": 1e-9, "schedule": "cosine"},
        model={"norm": "post", "activation": "gelu"},
        tokenizer={"joint": False, "type": "bpe"},
    )
    cfg = config_from_tree(tree)
    assert config_from_tree(yaml.safe_load(dump_config(cfg))) == cfg
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path) == cfg


def test_dumped_defaults_read_back_equal() -> None:
    assert config_from_tree(yaml.safe_load(dump_config(Config()))) == Config()
