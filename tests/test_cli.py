"""The command line end to end, in-process through `nmtkit.cli.main` (plus real subprocesses for the
entry points): a run directory that describes itself, resume, user errors that exit 2 without a
traceback, and translate/evaluate/tokenizer output that holds together."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, tiny_tree, write_jsonl
from nmtkit import native
from nmtkit.checkpoint import load_checkpoint
from nmtkit.cli import main

SOURCE = "Tell me something about yourself"
REFERENCE = "告诉我关于你的事情"
EOS_ID = 3
TOP_K = 3  # decode.top_k of the tiny config


@pytest.fixture(autouse=True)
def _restore_nmtkit_logger():
    """`main` points the nmtkit logger at the current stderr; put it back so tests don't leak handlers."""
    logger = logging.getLogger("nmtkit")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def write_config(path: Path, corpus: dict[str, Path], run_dir: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(tiny_tree(corpus, run_dir, **sections), allow_unicode=True), encoding="utf-8")
    return path


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """`main(argv)` with stdout and stderr captured, for fixtures that can't use capsys."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("cache"))
    return dest


# ----------------------------------------------------------------------------- nmtkit train


@pytest.fixture(scope="module")
def cli_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `nmtkit train --config tiny.yaml --set train.max_steps=6`, shared by the train tests (which copy it)."""
    d = tmp_path_factory.mktemp("cli")
    config = write_config(d / "tiny.yaml", corpus, d / "run")
    argv = ["train", "--config", str(config), "--set", "train.max_steps=6"]
    code, out, err = run_main(argv)
    return {"code": code, "out": out, "err": err, "argv": argv, "config": config, "run_dir": d / "run"}


def test_train_exits_0_and_reports_where_it_stopped(cli_run: dict) -> None:
    assert cli_run["code"] == 0, cli_run["err"]
    assert str(cli_run["run_dir"]) in cli_run["out"]
    assert "step 6" in cli_run["out"] and "train.max_steps=6" in cli_run["out"]


def test_train_writes_a_self_describing_run_directory(cli_run: dict) -> None:
    run_dir = cli_run["run_dir"]
    for name in (
        "config.yaml",
        "run.jsonl",
        "metrics.jsonl",
        "train.log",
        "tokenizer/spm.model",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).is_file(), name
    saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["max_steps"] == 6  # the resolved config, overrides applied
    assert saved["model"]["d_model"] == 32


def test_run_info_records_the_command_line_and_versions(cli_run: dict) -> None:
    (info,) = read_jsonl(cli_run["run_dir"] / "run.jsonl")
    assert info["command"][1:] == cli_run["argv"]
    assert {"nmtkit", "torch", "git"} <= set(info["versions"])
    assert info["versions"]["nmtkit"] and info["versions"]["torch"]


def test_run_info_names_python_m_nmtkit_as_typed(tmp_path: Path, monkeypatch) -> None:
    from nmtkit.config import Config
    from nmtkit.runinfo import write_run_info

    monkeypatch.setattr(sys, "argv", [str(ROOT / "src" / "nmtkit" / "__main__.py"), "train"])
    write_run_info(tmp_path, Config(), None, "cpu")
    assert read_jsonl(tmp_path / "run.jsonl")[0]["command"] == ["python -m nmtkit", "train"]


def test_run_info_of_a_checkout_script_records_a_command_that_reruns(tmp_path: Path, monkeypatch) -> None:
    """scripts/train.py adds "train" itself: its arguments are recorded as `nmtkit` takes them, not as `train.py train`."""
    from nmtkit.config import Config
    from nmtkit.runinfo import write_run_info

    monkeypatch.setattr(sys, "argv", ["scripts/train.py", "--config", "c.yaml"])
    write_run_info(tmp_path, Config(), ["train", "--config", "c.yaml"], "cpu")
    assert read_jsonl(tmp_path / "run.jsonl")[0]["command"] == ["nmtkit", "train", "--config", "c.yaml"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_is_nmtkits_own_not_that_of_a_project_it_is_installed_in(tmp_path: Path, monkeypatch) -> None:
    """nmtkit installed into a .venv inside someone's repository must not record that repository's commit."""
    from nmtkit import runinfo

    project = tmp_path / "project"
    package = project / ".venv" / "lib" / "python3" / "site-packages" / "nmtkit"
    package.mkdir(parents=True)
    env = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b", "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b"}
    for command in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *command], cwd=project, check=True, env={**os.environ, **env})
    monkeypatch.setattr(runinfo, "__file__", str(package / "runinfo.py"))
    assert runinfo.git_commit() == ""


def test_metrics_record_training_and_validation(cli_run: dict) -> None:
    records = read_jsonl(cli_run["run_dir"] / "metrics.jsonl")
    train_records = [r for r in records if "train_loss" in r]
    valid_records = [r for r in records if "valid_loss" in r]
    assert [r["step"] for r in train_records] == [3, 6]  # train.log_every = 3
    for r in train_records:
        assert {"step", "train_loss", "lr", "tgt_tokens_per_s", "elapsed_s"} <= set(r)
        assert r["train_loss"] > 0 and r["lr"] > 0 and r["tgt_tokens_per_s"] > 0 and r["elapsed_s"] >= 0
    assert [r["step"] for r in valid_records] == [6]
    assert valid_records[0]["valid_loss"] > 0


def test_metrics_count_epochs_from_1_as_the_log_does(cli_run: dict) -> None:
    log = (cli_run["run_dir"] / "train.log").read_text(encoding="utf-8")
    logged = {int(step): int(epoch) for step, epoch in re.findall(r"step (\d+) \| loss .*? \| epoch (\d+) \|", log)}
    records = read_jsonl(cli_run["run_dir"] / "metrics.jsonl")
    assert logged and {r["step"]: r["epoch"] for r in records if "train_loss" in r} == logged
    assert all(r["epoch"] == logged[r["step"]] for r in records if "valid_loss" in r)


def test_train_log_has_one_greppable_line_per_log_step(cli_run: dict) -> None:
    log = (cli_run["run_dir"] / "train.log").read_text(encoding="utf-8")
    assert re.search(r"step 3 \| loss \d+\.\d+ \| lr \S+ \| tok/s", log), log
    assert re.search(r"step 6 \| loss \d", log)
    assert re.search(r"step 6 \| valid loss \d", log)


def test_checkpoints_hold_the_step_and_the_config(cli_run: dict) -> None:
    last = load_checkpoint(cli_run["run_dir"] / "checkpoints" / "last.pt")
    assert last["step"] == 6
    assert last["config"]["train"]["max_steps"] == 6


def test_rerun_with_more_steps_continues_from_the_last_step(cli_run: dict, tmp_path: Path) -> None:
    run_dir = copy_run(cli_run["run_dir"], tmp_path / "run")
    before = read_jsonl(run_dir / "metrics.jsonl")
    code, out, err = run_main(
        ["train", "--config", str(cli_run["config"]), "--set", "train.max_steps=9", "--set", f"train.run_dir={run_dir}"]
    )
    assert code == 0, err
    assert "step 9" in out
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert records[: len(before)] == before  # appended, not rewritten
    assert records[len(before)] == {"step": 6, "resumed": True}  # where `nmtkit plot` cuts what a stopped run logged later
    new_steps = [r["step"] for r in records[len(before) + 1 :]]
    assert new_steps and min(new_steps) > 6 and max(new_steps) == 9
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 9
    assert re.search(r"resumed from \S+ at step 6", (run_dir / "train.log").read_text(encoding="utf-8"))
    assert len(read_jsonl(run_dir / "run.jsonl")) == 2  # one line per start


def test_a_fresh_start_beside_an_earlier_runs_records_marks_where_its_own_begin(cli_run: dict, tmp_path: Path) -> None:
    """Without last.pt the run starts afresh; its records must not read as a continuation of the earlier ones."""
    run_dir = copy_run(cli_run["run_dir"], tmp_path / "run")
    (run_dir / "checkpoints" / "last.pt").unlink()
    before = read_jsonl(run_dir / "metrics.jsonl")
    code, _, err = run_main(["train", "--config", str(cli_run["config"]), "--set", "train.max_steps=3", "--set", f"train.run_dir={run_dir}"])
    assert code == 0, err
    assert "holds the records of an earlier run but no last.pt: this run starts afresh" in err
    assert read_jsonl(run_dir / "metrics.jsonl")[len(before)] == {"step": 0, "resumed": True}


def test_rerun_with_the_same_max_steps_does_nothing(cli_run: dict, tmp_path: Path) -> None:
    run_dir = copy_run(cli_run["run_dir"], tmp_path / "run")
    metrics_before = (run_dir / "metrics.jsonl").read_text(encoding="utf-8")
    code, out, err = run_main(
        ["train", "--config", str(cli_run["config"]), "--set", "train.max_steps=6", "--set", f"train.run_dir={run_dir}"]
    )
    assert code == 0, err
    assert "step 6" in out
    # nothing trained: only the resume mark is appended (a stopped run's later records would be dropped at step 6)
    assert (run_dir / "metrics.jsonl").read_text(encoding="utf-8") == metrics_before + '{"step": 6, "resumed": true}\n'
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6


def test_resume_with_a_changed_model_exits_2_naming_the_difference(cli_run: dict, tmp_path: Path) -> None:
    run_dir = copy_run(cli_run["run_dir"], tmp_path / "run")
    argv = ["train", "--config", str(cli_run["config"]), "--set", "model.d_ff=128", "--set", f"train.run_dir={run_dir}"]
    code, out, err = run_main(argv)
    assert code == 2
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "model.d_ff" in line)
    assert "64" in line and "128" in line
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6


def test_refused_resume_leaves_the_run_config_untouched(cli_run: dict, tmp_path: Path) -> None:
    run_dir = copy_run(cli_run["run_dir"], tmp_path / "run")
    before = (run_dir / "config.yaml").read_text(encoding="utf-8")
    argv = ["train", "--config", str(cli_run["config"]), "--set", "model.d_ff=128", "--set", f"train.run_dir={run_dir}"]
    assert run_main(argv)[0] == 2
    assert (run_dir / "config.yaml").read_text(encoding="utf-8") == before


def test_config_errors_exit_2_listing_every_problem_without_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default run_dir is relative: a run started by mistake would show up here
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  lrr: 0.1\n  warmup_steps: -3\nmodel:\n  norm: middle\n", encoding="utf-8")
    assert main(["train", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and captured.out == ""
    assert "3 config problem(s)" in captured.err and str(config) in captured.err
    for expected in ("train.lrr", "did you mean 'lr'", "train.warmup_steps", "model.norm", "'pre'"):
        assert expected in captured.err
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "train.lr"], "section.key=value"),
        (["--set", "train.max_stepz=3"], "did you mean 'max_steps'"),
        (["--config", "no/such/config.yaml"], "config file not found: no/such/config.yaml"),
    ],
    ids=["bad-override-syntax", "unknown-override-key", "missing-config-file"],
)
def test_bad_command_line_config_exits_2(argv: list[str], expected: str, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the defaults' run_dir is relative; nothing may be written anyway
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_max_len_beyond_the_model_positions_exits_2_before_the_run_directory_exists(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", data={"max_len": 200})  # max_positions 128
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.max_len: 200" in err and "model.max_positions=128" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_run_directory_under_a_file_exits_2_naming_it(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "a file").write_text("")
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "a file" / "run")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "cannot create the run directory" in err and "a file/run" in err and "Traceback" not in err


def test_a_train_log_that_cannot_be_written_is_named_and_training_goes_on(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "run" / "train.log").mkdir(parents=True)  # a directory where the log file should be
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", train={"max_steps": 2})
    assert main(["train", "--config", str(config)]) == 0
    assert f"cannot write {tmp_path / 'run' / 'train.log'}" in capsys.readouterr().err


def test_validation_split_without_a_pair_the_model_can_read_exits_2_naming_data_valid(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    long_pair = {"translation": {"en": " ".join(["word"] * 200), "zh": "字" * 200}}  # beyond max_positions 128
    valid = write_jsonl(tmp_path / "long-valid.jsonl", [long_pair] * 3)
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    assert main(["train", "--config", str(config), "--set", f"data.valid={valid}"]) == 2
    err = capsys.readouterr().err
    assert f"data.valid ({valid}): no pairs to validate on (valid: 0 of 3 pairs (3 longer than model.max_positions=128))" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_a_tokenizer_trained_with_other_settings_is_refused_naming_them(corpus: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    """A first attempt that stopped after training its tokenizer (no checkpoint yet) must not lend that tokenizer to
    a second attempt with another vocabulary size."""
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    assert main(["tokenizer", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "--config", str(config), "--set", "tokenizer.vocab_size=500"]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.vocab_size: tokenizer trained with 1200, config has 500" in err and "Traceback" not in err
    # the same settings, the data path spelled another way: reused
    assert main(["tokenizer", "--config", str(config), "--set", f"data.train={corpus['train'].parent}/./{corpus['train'].name}"]) == 0
    # ... relative instead of absolute, or through a link: the same file, reused
    monkeypatch.chdir(corpus["train"].parent)
    assert main(["tokenizer", "--config", str(config), "--set", f"data.train={corpus['train'].name}"]) == 0
    (tmp_path / "link.jsonl").symlink_to(corpus["train"])
    assert main(["tokenizer", "--config", str(config), "--set", f"data.train={tmp_path / 'link.jsonl'}"]) == 0
    # another file is refused, named
    other = tmp_path / "other.jsonl"
    other.write_bytes(corpus["train"].read_bytes())
    assert main(["tokenizer", "--config", str(config), "--set", f"data.train={other}"]) == 2
    assert f"data.train: tokenizer trained with {str(corpus['train'])!r}, config has {str(other)!r}" in capsys.readouterr().err
    # a damaged record is named, with the way out
    record = tmp_path / "run" / "tokenizer" / "trained_from.json"
    record.write_text('{"tokenizer.vocab_size": 12', encoding="utf-8")
    assert main(["tokenizer", "--config", str(config)]) == 2
    assert f"{record}: not a JSON object of settings; delete it" in capsys.readouterr().err
    # a tokenizer put in place by hand has no record of its settings, and is used as it is
    record.unlink()
    assert main(["tokenizer", "--config", str(config), "--set", "tokenizer.vocab_size=500"]) == 0


# ----------------------------------------------------------------------------- nmtkit tokenizer


def test_tokenizer_command_reports_vocabulary_and_special_ids(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    assert main(["tokenizer", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    sizes = re.search(r"vocabulary: source (\d+), target (\d+)", out)
    assert sizes and int(sizes[1]) == int(sizes[2]) > 4  # joint
    assert "pad 0, unk 1, bos 2, eos 3" in out
    assert (tmp_path / "run" / "tokenizer" / "spm.model").is_file()


# ----------------------------------------------------------------------------- nmtkit translate


def translate_jsonl(capsys, argv: list[str]) -> list[dict]:
    assert main(["translate", "--format", "jsonl", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_translate_show_tokens_prints_the_token_table_and_reference(trained_run: Path, capsys) -> None:
    code = main(["translate", "--checkpoint", str(trained_run), SOURCE, "--show-tokens", "--reference", REFERENCE])
    out = capsys.readouterr().out
    assert code == 0
    assert f"source:      {SOURCE}" in out and "translation: " in out
    header = next(line for line in out.splitlines() if line.strip().startswith("pos"))
    for column in ("pos", "piece", "prob", "loss", "entropy"):
        assert column in header
    assert "total loss" in out and "mean loss" in out
    assert f"reference:   {REFERENCE}" in out and "greedy" in out
    assert out.count("total loss") == 2  # the translation's and the reference's


def test_translate_prints_only_translations_by_default(trained_run: Path, capsys) -> None:
    assert main(["translate", "--checkpoint", str(trained_run), SOURCE, "Hello."]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and not any("source:" in line for line in lines)


def test_translate_jsonl_has_exactly_the_public_keys(trained_run: Path, capsys) -> None:
    (record,) = translate_jsonl(capsys, ["--checkpoint", str(trained_run), SOURCE, "--reference", REFERENCE])
    assert set(record) == {"source", "translation", "tokens", "total_loss", "mean_loss", "reference", "truncated"}
    assert record["source"] == SOURCE and isinstance(record["translation"], str)
    for token in record["tokens"]:
        assert set(token) == {"position", "piece", "id", "prob", "loss", "entropy", "top_k"}
        for alt in token["top_k"]:
            assert set(alt) == {"piece", "id", "prob"}
    ref = record["reference"]
    assert set(ref) == {"text", "tokens", "total_loss", "mean_loss"}
    for token in ref["tokens"]:
        assert set(token) == {"position", "piece", "id", "prob", "loss", "greedy_match"}


def test_translate_takes_each_reference_beside_its_sentence(trained_run: Path, capsys) -> None:
    """`--reference R1 S1 --reference R2 S2`: the sentences between options are all translated, in order; an unknown
    option among them is still refused."""
    records = translate_jsonl(capsys, ["--checkpoint", str(trained_run), "--reference", "你好。", "Hello.", "--reference", REFERENCE, SOURCE])
    assert [(r["source"], r["reference"]["text"]) for r in records] == [("Hello.", "你好。"), (SOURCE, REFERENCE)]
    with pytest.raises(SystemExit):
        main(["translate", "--checkpoint", str(trained_run), "Hello.", "--reference", "你好。", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_translate_sentences_that_start_with_a_dash_are_text_where_argparse_takes_them_so() -> None:
    from nmtkit.cli import build_parser, parse_arguments

    argv = ["translate", "--checkpoint", "c", "--reference", "R1", "S1", "--reference", "R2", "- an item", "--", "-x"]
    args = parse_arguments(build_parser(), argv)
    assert (args.text, args.reference) == (["S1", "- an item", "-x"], ["R1", "R2"])


def test_translate_jsonl_without_reference_has_null_reference(trained_run: Path, capsys) -> None:
    (record,) = translate_jsonl(capsys, ["--checkpoint", str(trained_run), SOURCE])
    assert record["reference"] is None


def test_translate_token_records_hold_together(trained_run: Path, capsys) -> None:
    records = translate_jsonl(capsys, ["--checkpoint", str(trained_run), SOURCE, "Hello.", "I like cats very much."])
    for record in records:
        tokens = record["tokens"]
        assert tokens, record
        assert [t["position"] for t in tokens] == list(range(len(tokens)))
        for t in tokens:
            assert 0.0 < t["prob"] <= 1.0
            assert t["loss"] == pytest.approx(-math.log(t["prob"]), rel=1e-5, abs=1e-6)
            assert t["entropy"] >= -1e-6
            probs = [a["prob"] for a in t["top_k"]]
            assert len(probs) == TOP_K and probs == sorted(probs, reverse=True)
        # Greedy: every chosen token is the most probable one. The last may be an EOS forced by the
        # length budget (see test_budget_forced_eos_reports_the_probability_of_eos), so it is checked for its id only.
        for t in tokens[:-1]:
            assert t["top_k"][0]["id"] == t["id"] and t["top_k"][0]["prob"] == pytest.approx(t["prob"])
            assert t["id"] != EOS_ID
        assert tokens[-1]["id"] == EOS_ID and tokens[-1]["piece"] == "</s>"
        assert record["total_loss"] == pytest.approx(sum(t["loss"] for t in tokens))
        assert record["mean_loss"] == pytest.approx(record["total_loss"] / len(tokens))


def test_translate_reference_scores_hold_together(trained_run: Path, capsys) -> None:
    (record,) = translate_jsonl(capsys, ["--checkpoint", str(trained_run), SOURCE, "--reference", REFERENCE])
    ref = record["reference"]
    assert ref["text"] == REFERENCE
    tokens = ref["tokens"]
    assert [t["position"] for t in tokens] == list(range(len(tokens)))
    assert tokens[-1]["id"] == EOS_ID
    for t in tokens:
        assert 0.0 < t["prob"] <= 1.0
        assert t["loss"] == pytest.approx(-math.log(t["prob"]), rel=1e-4, abs=1e-5)
    assert ref["total_loss"] == pytest.approx(sum(t["loss"] for t in tokens))
    assert ref["mean_loss"] == pytest.approx(ref["total_loss"] / len(tokens))
    # Both start from BOS alone, so the first reference token is greedy exactly when it is what was generated.
    assert tokens[0]["greedy_match"] == (tokens[0]["id"] == record["tokens"][0]["id"])


def test_the_python_api_refuses_arguments_it_cannot_honour(trained_run: Path) -> None:
    from nmtkit.device import DeviceError
    from nmtkit.translator import Translator

    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    with pytest.raises(TypeError, match=r"a list of sentences, not one str; use translate\(\[text\]\)"):
        translator.translate("Hello.")  # type: ignore[arg-type]  # a str would be one sentence per character
    with pytest.raises(ValueError, match="top_k=0: alternatives per token must be at least 1"):
        translator.translate(["Hello."], top_k=0)
    with pytest.raises(ValueError, match="length_penalty=nan: expected a finite number"):
        translator.translate(["Hello."], beam_size=2, length_penalty=float("nan"))
    # any other device string used to run on the CPU without a word
    with pytest.raises(DeviceError, match="device 'cuda:0': expected 'auto', 'cpu' or 'cuda'; to pick one GPU, set CUDA_VISIBLE_DEVICES"):
        Translator.from_checkpoint(trained_run, "cuda:0", "fp32")
    with pytest.raises(DeviceError, match="precision 'int8': expected 'auto', 'fp32', 'bf16', 'fp16'"):
        Translator.from_checkpoint(trained_run, "cpu", "int8")


def test_the_html_page_of_text_with_undecodable_bytes_is_written_with_replacement_characters(trained_run: Path, tmp_path: Path) -> None:
    """The API translates such text (decoding drops the surrogates that stand for the bytes); the page shows U+FFFD."""
    from nmtkit.html_view import write_html
    from nmtkit.translator import Translator

    line = b"I like caf\xe9s.".decode("utf-8", "surrogateescape")
    write_html(tmp_path / "page.html", Translator.from_checkpoint(trained_run, "cpu", "fp32").translate([line]))
    assert "caf\ufffds." in (tmp_path / "page.html").read_text(encoding="utf-8")


def test_budget_forced_eos_reports_the_probability_of_eos(trained_run: Path) -> None:
    from nmtkit.translator import Translator

    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    translator.cfg.decode.max_len_a, translator.cfg.decode.max_len_b = 0.0, 3  # every output ends at 3 tokens
    for result in translator.translate([SOURCE, "Hello.", "I like cats very much."], top_k=TOP_K):
        last = result.tokens[-1]
        assert last.id == EOS_ID
        listed = {a.id: a.prob for a in last.top_k}
        if EOS_ID in listed:
            assert last.prob == pytest.approx(listed[EOS_ID])
        else:
            assert last.prob <= min(listed.values())
        # cut short exactly when the model's first choice at the budget was not </s>
        assert result.truncated == (last.top_k[0].id != EOS_ID)
    beam = translator.translate([SOURCE], top_k=TOP_K, beam_size=3)[0]
    assert len(beam.tokens) == 3 and beam.truncated == (beam.tokens[-1].top_k[0].id != EOS_ID)


def test_a_truncated_translation_says_so_in_the_table_and_the_jsonl(trained_run: Path) -> None:
    from nmtkit.show import format_translation
    from nmtkit.translator import Translator

    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    translator.cfg.decode.max_len_a, translator.cfg.decode.max_len_b = 0.0, 1  # room for </s> alone
    result = translator.translate([SOURCE], top_k=TOP_K)[0]
    assert [t.id for t in result.tokens] == [EOS_ID] and result.truncated  # the model never starts with </s>
    assert "truncated: the length budget ended the output" in format_translation(result, show_tokens=True)
    assert result.to_json()["truncated"] is True


def test_bits_alone_prints_the_token_table_with_a_bits_column(trained_run: Path, capsys) -> None:
    assert main(["translate", "--checkpoint", str(trained_run), "--bits", SOURCE]) == 0
    out = capsys.readouterr().out
    assert "entropy    bits  top alternatives" in out and "total loss" in out


def test_translate_reads_sentences_from_an_input_file(trained_run: Path, tmp_path: Path, capsys) -> None:
    sentences = [SOURCE, "Hello.", "I like cats very much.", "Where is the station?", "Thank you."]
    path = tmp_path / "input.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    batched = translate_jsonl(capsys, ["--checkpoint", str(trained_run), "--input", str(path), "--batch-size", "2"])
    assert [r["source"] for r in batched] == sentences
    whole = translate_jsonl(capsys, ["--checkpoint", str(trained_run), "--input", str(path), "--batch-size", "16"])
    assert [r["translation"] for r in batched] == [r["translation"] for r in whole]  # batching changes nothing


def test_a_blank_source_line_gives_a_blank_line_back_with_no_tokens(trained_run: Path, tmp_path: Path, capsys) -> None:
    """A blank line (a paragraph break in a document) stays blank, so the output stays line-aligned with the input:
    decoded, an empty source gets whatever the model invents from </s> alone."""
    from nmtkit.show import format_translation
    from nmtkit.translator import Translator

    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    blank, spaces, text = translator.translate(["", "   ", SOURCE], references=["", "你好。", REFERENCE], top_k=TOP_K)
    assert text.tokens and text.translation
    for result in (blank, spaces):
        assert (result.translation, result.tokens, result.total_loss, result.truncated) == ("", [], 0.0, False)
        assert "a blank source: nothing was translated" in format_translation(result, show_tokens=True)
    assert [t.piece for t in spaces.reference.tokens][-1] == "</s>" and spaces.reference.total_loss > 0  # still scored
    beam_blank, beam_text = translator.translate(["", SOURCE], top_k=TOP_K, beam_size=3, nbest=2)
    assert [(h.translation, h.tokens) for h in beam_blank.nbest] == [("", [])] and len(beam_text.nbest) == 2
    path = tmp_path / "input.txt"
    path.write_text(f"{SOURCE}\n\nHello.\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(trained_run), "--input", str(path)]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2] and lines[3] == ""


def test_translate_reads_sentences_from_stdin(trained_run: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello.\nThank you.\nWhere is the station?\n"))
    assert main(["translate", "--checkpoint", str(trained_run), "--batch-size", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_translate_reads_references_from_a_file(trained_run: Path, tmp_path: Path, capsys) -> None:
    refs = tmp_path / "refs.txt"
    refs.write_text(f"{REFERENCE}\n你好。\n", encoding="utf-8")
    records = translate_jsonl(capsys, ["--checkpoint", str(trained_run), SOURCE, "Hello.", "--references", str(refs)])
    assert [r["reference"]["text"] for r in records] == [REFERENCE, "你好。"]


def test_translate_with_mismatched_references_exits_2(trained_run: Path, capsys) -> None:
    assert main(["translate", "--checkpoint", str(trained_run), SOURCE, "Hello.", "--reference", REFERENCE]) == 2
    err = capsys.readouterr().err
    assert "1 references for 2 sentences" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--top-k", "--batch-size"])
def test_translate_refuses_zero_for_counts_that_need_one_or_more(flag: str, trained_run: Path, capsys) -> None:
    """0 used to mean "the run's default" without a word."""
    with pytest.raises(SystemExit) as info:
        main(["translate", "--checkpoint", str(trained_run), flag, "0", SOURCE])
    assert info.value.code == 2 and f"argument {flag}: expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_translate_refuses_more_nbest_than_beam_before_loading_a_model(tmp_path: Path, capsys) -> None:
    assert main(["translate", "--checkpoint", str(tmp_path / "not-there"), "--beam", "2", "--nbest", "3", SOURCE]) == 2
    assert "--beam 2 --nbest 3: nbest must be between 1 and the beam size (2), got 3" in capsys.readouterr().err


def test_translate_and_evaluate_take_the_length_budget_from_the_command_line(trained_run: Path, capsys) -> None:
    """--max-len-a/--max-len-b in place of the run's decode.max_len_a/max_len_b (fairseq's flags)."""
    records = translate_jsonl(capsys, ["--checkpoint", str(trained_run), "--max-len-a", "0", "--max-len-b", "2", SOURCE, "Hello."])
    assert [len(r["tokens"]) for r in records] == [2, 2]  # the tiny model never stops that early: cut at 2, </s> included
    assert main(["evaluate", "--checkpoint", str(trained_run), "--limit", "3", "--max-len-a", "0", "--max-len-b", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bleu"] == 0.0  # </s> alone: every translation is empty


def test_translate_with_a_missing_input_file_exits_2(trained_run: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["translate", "--checkpoint", str(trained_run), "--input", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- nmtkit evaluate


def evaluate_json(capsys, argv: list[str]) -> dict:
    assert main(["evaluate", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_json_reports_consistent_metrics(trained_run: Path, capsys) -> None:
    m = evaluate_json(capsys, ["--checkpoint", str(trained_run)])
    assert {"loss", "perplexity", "token_accuracy", "sentences", "tokens", "bleu", "chrf", "sacrebleu_signature"} <= set(m)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
    assert m["sentences"] == 40  # the test split of the corpus fixture
    assert m["tokens"] > m["sentences"]  # every target has at least its EOS
    assert 0.0 <= m["token_accuracy"] <= 1.0
    assert 0.0 <= m["bleu"] <= 100.0 and 0.0 <= m["chrf"] <= 100.0
    assert "tok:zh" in m["sacrebleu_signature"]


def test_evaluate_prints_a_table_by_default(trained_run: Path, capsys) -> None:
    assert main(["evaluate", "--checkpoint", str(trained_run)]) == 0
    out = capsys.readouterr().out
    for label in ("sentences", "loss", "perplexity", "token accuracy", "BLEU", "chrF", "tok:zh"):
        assert label in out
    assert re.search(r"sentences\s+40\b", out)


def test_evaluate_without_bleu_skips_decoding(trained_run: Path, capsys) -> None:
    m = evaluate_json(capsys, ["--checkpoint", str(trained_run), "--no-bleu", "--limit", "5"])
    assert m["sentences"] == 5 and "bleu" not in m and "chrf" not in m


def test_evaluate_reads_a_tsv_data_file(trained_run: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "pairs.tsv"
    data.write_text("en\tzh\nHello.\t你好。\nThank you.\t谢谢。\nI like cats.\t我喜欢猫。\n", encoding="utf-8")
    m = evaluate_json(capsys, ["--checkpoint", str(trained_run), "--data", str(data)])
    assert m["sentences"] == 3 and m["data"] == str(data)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))


def test_evaluate_with_no_readable_pair_exits_2_naming_the_file(trained_run: Path, tmp_path: Path, capsys) -> None:
    too_long = write_jsonl(tmp_path / "long.jsonl", [{"translation": {"en": " ".join(["word"] * 300), "zh": "字" * 300}}])
    assert main(["evaluate", "--checkpoint", str(trained_run), "--data", str(too_long)]) == 2
    err = capsys.readouterr().err
    assert f"{too_long} (test): no pairs to evaluate" in err and "1 longer than model.max_positions=128" in err
    assert "Traceback" not in err


def test_evaluate_beam_wider_than_the_vocabulary_allows_exits_2_before_decoding(trained_run: Path, capsys) -> None:
    assert main(["evaluate", "--checkpoint", str(trained_run), "--beam", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--beam 100000: beam size 100000 needs a target vocabulary of at least 200000" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["translate", "Hello.", "--top-k", "-1"], ["translate", "Hello.", "--batch-size", "-1"], ["evaluate", "--limit", "-1"],
     ["translate", "Hello.", "--beam", "0"], ["benchmark", "--steps", "0"]],
    ids=["top-k", "batch-size", "limit", "beam", "benchmark-steps"],
)
def test_negative_or_zero_counts_on_the_command_line_exit_2_naming_the_flag(argv: list[str], trained_run: Path, capsys) -> None:
    flag, value = argv[-2:]
    with pytest.raises(SystemExit) as info:
        main([*argv[:1], "--checkpoint", str(trained_run), *argv[1:]] if argv[0] != "benchmark" else argv)
    assert info.value.code == 2
    assert f"{flag}: expected a whole number >= " in capsys.readouterr().err


def test_stdin_lines_end_at_line_feeds_only(monkeypatch) -> None:
    from nmtkit.text_input import read_lines

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello.\rThank you.\r\nI like cats.\n"), encoding="utf-8"))
    assert read_lines("-", "--input") == ["Hello.\rThank you.", "I like cats."]


def test_translate_input_file_lines_end_at_line_feeds_only(trained_run: Path, tmp_path: Path, capsys) -> None:
    """A stray carriage return inside a line keeps its sentence whole (as `wc -l` counts); CRLF endings are dropped."""
    inputs = tmp_path / "in.txt"
    inputs.write_bytes(b"Hello.\rThank you.\r\nI like cats.\n")
    records = translate_jsonl(capsys, ["--checkpoint", str(trained_run), "--input", str(inputs)])
    assert [r["source"] for r in records] == ["Hello.\rThank you.", "I like cats."]


@pytest.mark.parametrize("command", [["evaluate"], ["translate", "Hello."]], ids=["evaluate", "translate"])
def test_missing_checkpoint_exits_2_naming_the_path(command: list[str], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-run"
    assert main([*command, "--checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and str(missing) in err and "Traceback" not in err


# ----------------------------------------------------------------------------- entry points


def test_python_m_nmtkit_help_lists_the_subcommands(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "nmtkit", "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "tokenizer", "translate", "evaluate"):
        assert command in proc.stdout


def test_translate_script_runs_as_a_subprocess(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "translate.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "usage: nmtkit translate" in proc.stdout and "--show-tokens" in proc.stdout


@pytest.mark.parametrize("command", ["train", "translate", "evaluate"])
def test_scripts_are_thin_wrappers_over_the_cli(command: str, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [f"{command}.py", "--help"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "scripts" / f"{command}.py"), run_name="__main__")
    assert info.value.code == 0
    assert f"usage: nmtkit {command}" in capsys.readouterr().out


def test_benchmark_json_reports_the_measured_figures_and_writes_the_profile(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    profile = tmp_path / "profile.txt"
    argv = ["benchmark", "--config", str(config), "--device", "cpu", "--precision", "fp32", "--steps", "2", "--repeats", "1",
            "--sentences", "8", "--batch-size", "4", "--json", "--profile", str(profile)]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("train_tgt_tokens_per_s", "decode_sent_per_s", "decode_tokens_per_s", "peak_rss_mib", "mfu"):
        assert r[key] > 0, key
    assert (r["device"], r["precision"], r["decode_sentences"]) == ("cpu", "fp32", 8)
    assert r["decode_tokens_per_s"] == pytest.approx(48 * r["decode_sent_per_s"])  # exactly 48 new tokens each
    assert r["decode_kernels"] == r["train_loss_kernel"] == ("torch" if native.kernels() is None else "native")  # which path it measured
    assert r["training_attention"] == "matmuls"  # train.attention_kernel auto on CPU
    table = profile.read_text()
    # the training step's matmuls, by their own time: torch's BLAS op or oneDNN's, as cpu_matmul chose
    assert ("aten::mm" in table or "mkldnn::_linear_pointwise" in table) and "Self CPU" in table


def test_benchmark_takes_device_and_precision_from_the_config_unless_flags_say_otherwise(corpus: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from nmtkit import benchmark

    asked = []
    monkeypatch.setattr(benchmark, "run_benchmark", lambda cfg, settings, checkpoint: asked.append(settings) or {})
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", train={"device": "cpu", "precision": "fp32"})
    assert main(["benchmark", "--config", str(config), "--json"]) == 0
    assert main(["benchmark", "--config", str(config), "--json", "--precision", "bf16", "--device", "auto"]) == 0
    assert [(s.device, s.precision) for s in asked] == [("cpu", "fp32"), ("auto", "bf16")]


def test_benchmark_decodes_in_the_configs_batch_size_and_top_k_unless_the_flag_says_otherwise(corpus: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from nmtkit import benchmark

    asked = []
    monkeypatch.setattr(benchmark, "run_benchmark", lambda cfg, settings, checkpoint: asked.append(settings) or {})
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", decode={"batch_size": 8, "top_k": 4})
    assert main(["benchmark", "--config", str(config), "--json"]) == 0
    assert main(["benchmark", "--config", str(config), "--json", "--batch-size", "64"]) == 0
    assert [(s.batch_size, s.top_k) for s in asked] == [(8, 4), (64, 4)]


def test_benchmark_decodes_a_checkpoints_own_weights_after_its_training_steps(trained_run: Path, corpus: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    """--checkpoint is for decoding trained weights (--eos stops where the model stops): the timed training steps
    must not have changed them first."""
    import torch

    from nmtkit import benchmark
    from nmtkit.checkpoint import load_checkpoint, resolve_checkpoint

    decoded = []
    monkeypatch.setattr(benchmark, "benchmark_decoding", lambda model, *a, **k: decoded.append({n: t.clone() for n, t in model.state_dict().items()}) or {})
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    argv = ["benchmark", "--config", str(config), "--device", "cpu", "--precision", "fp32", "--steps", "2", "--repeats", "1",
            "--checkpoint", str(trained_run), "--json"]
    assert main(argv) == 0
    saved = load_checkpoint(resolve_checkpoint(trained_run))["model"]
    assert all(torch.equal(decoded[0][name], saved[name]) for name in saved)


def test_benchmark_of_a_checkpoint_shorter_than_the_data_is_a_config_error(trained_run: Path, corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", data={"max_len": 200}, train={"max_tokens": 1024})
    assert main(["benchmark", "--config", str(config), "--device", "cpu", "--steps", "1", "--checkpoint", str(trained_run)]) == 2
    err = capsys.readouterr().err
    assert "model.max_positions=128 is shorter than the config's data.max_len + 1 = 201" in err and "Traceback" not in err


def test_unknown_cpu_matmul_backend_exits_2_naming_the_variable(corpus: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("NMTKIT_CPU_MATMUL", "mkl")
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run")
    assert main(["benchmark", "--config", str(config), "--device", "cpu", "--precision", "bf16", "--steps", "1", "--no-decode"]) == 2
    assert "nmtkit benchmark: error: NMTKIT_CPU_MATMUL='mkl': expected one of auto, onednn, blas" in capsys.readouterr().err


def test_benchmark_with_no_training_pair_left_exits_2_naming_the_filters(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path / "tiny.yaml", corpus, tmp_path / "run", data={"max_len": 1})
    assert main(["benchmark", "--config", str(config), "--device", "cpu", "--steps", "2", "--repeats", "1", "--no-decode"]) == 2
    err = capsys.readouterr().err
    assert "data.train" in err and "data.max_len" in err and "Traceback" not in err
