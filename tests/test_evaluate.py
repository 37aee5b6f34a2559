"""`nmtkit evaluate`'s choices around the data: a file given on the command line is read as a file, its Arrow cache goes
where the run keeps its own (or the `datasets` cache, never beside a loose checkpoint), and a BLEU tokenizer that
needs missing extras stops the evaluation before any decoding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest

from nmtkit import evaluate
from nmtkit.checkpoint import load_checkpoint, write_atomic
from nmtkit.cli import main
from nmtkit.config import DataConfig
from nmtkit.data import DataError
from nmtkit.evaluate import _cache_dir, bleu_metric, evaluation_data


def checkpoint_with_data(trained_run: Path, tmp_path: Path, **data: str) -> Path:
    """A copy of the trained run's best checkpoint whose config has these data settings."""
    state = load_checkpoint(trained_run / "checkpoints" / "best.pt")
    state["config"]["data"].update(data)
    path = tmp_path / "model.pt"
    write_atomic(state, path)
    return path


def test_a_data_file_replaces_the_split_and_is_read_as_a_file_even_for_a_hub_trained_model() -> None:
    hub = DataConfig(hub_name="wmt/wmt14", hub_config="de-en", src_lang="en", tgt_lang="de")
    data = evaluation_data(hub, "test", "mine.tsv")
    assert (data.test, data.hub_name, data.hub_config) == ("mine.tsv", "", "")
    assert evaluation_data(hub, "test", None) is hub  # no file: the run's own split


def test_the_evaluation_cache_is_the_runs_own_or_the_datasets_cache(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n", encoding="utf-8")
    assert _cache_dir("", run / "checkpoints" / "best.pt") == str(run / "cache")
    assert _cache_dir("", tmp_path / "model.pt") == str(datasets.config.HF_DATASETS_CACHE)  # not tmp_path/../cache
    # a folder that happens to be called checkpoints, outside any run
    assert _cache_dir("", tmp_path / "checkpoints" / "model.pt") == str(datasets.config.HF_DATASETS_CACHE)
    assert _cache_dir("/data/arrow", tmp_path / "model.pt") == "/data/arrow"


def test_a_read_only_run_directory_is_evaluated_with_its_tables_in_the_datasets_cache(tmp_path: Path, monkeypatch) -> None:
    """Another user's run, or one on a read-only mount: os.access says no, so the tables go where they can."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n", encoding="utf-8")
    writable = evaluate.os.access
    monkeypatch.setattr(evaluate.os, "access", lambda path, mode: False if Path(path) == run else writable(path, mode))
    assert _cache_dir("", run / "checkpoints" / "best.pt") == str(datasets.config.HF_DATASETS_CACHE)
    (run / "cache").mkdir()  # a cache folder of its own that is writable is used, whatever the run directory's mode
    assert _cache_dir("", run / "checkpoints" / "best.pt") == str(run / "cache")


def test_a_cache_folder_that_cannot_be_written_is_a_data_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    """Not the line scan and the Python reader's fallback, whose message blamed the file."""
    from nmtkit.data import load_split

    path = tmp_path / "test.jsonl"
    path.write_text('{"translation": {"en": "Hi.", "zh": "你好。"}}\n', encoding="utf-8")
    cache = tmp_path / "cache"

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system", str(cache / "files" / "x"))

    monkeypatch.setattr(datasets, "load_dataset", read_only)
    with pytest.raises(DataError, match=rf"{path}: could not write its tables into the cache folder {cache}: Read-only file system; make it writable, or set data.cache_dir"):
        load_split(DataConfig(train=str(path)), "train", cache)


@pytest.mark.skipif(importlib.util.find_spec("MeCab") is not None, reason="sacrebleu's Japanese extras are installed")
def test_a_japanese_target_without_sacrebleus_extras_is_a_data_error_naming_the_install() -> None:
    with pytest.raises(DataError, match=r"data.tgt_lang 'ja': BLEU's 'ja-mecab' tokenizer needs extra packages.*sacrebleu\[ja\]"):
        bleu_metric("ja")


def test_evaluate_reads_a_data_file_for_a_model_trained_on_a_hub_corpus(trained_run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = checkpoint_with_data(trained_run, tmp_path, hub_name="no-such-user/no-such-corpus")
    data = tmp_path / "pairs.tsv"
    data.write_text("en\tzh\nHello.\t你好。\nThank you.\t谢谢。\n", encoding="utf-8")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--no-bleu", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"sentences": 2' in out and '"split": null' in out  # a file of its own, no split of the run's
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--no-bleu"]) == 0
    assert f"data  {data}\n" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("MeCab") is not None, reason="sacrebleu's Japanese extras are installed")
def test_evaluate_stops_on_missing_bleu_extras_before_any_decoding(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before checking the BLEU tokenizer")

    monkeypatch.setattr(evaluate, "translate_all", no_decoding)
    checkpoint = checkpoint_with_data(trained_run, tmp_path, tgt_lang="ja")
    assert main(["evaluate", "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "BLEU's 'ja-mecab' tokenizer needs extra packages" in err and "Traceback" not in err


def test_a_missing_test_file_says_how_evaluate_names_another(trained_run: Path, tmp_path: Path, capsys) -> None:
    """evaluate has no --set: its advice for the checkpoint's (relative) path is --data, and a missing --data file is
    named as such."""
    checkpoint = checkpoint_with_data(trained_run, tmp_path, test="not/here/test.jsonl")
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--no-bleu"]) == 2
    err = capsys.readouterr().err
    assert "data.test: file not found: not/here/test.jsonl" in err and "--data PATH" in err and "--set" not in err
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--no-bleu", "--data", str(tmp_path / "nope.tsv")]) == 2
    err = capsys.readouterr().err
    assert f"--data: file not found: {tmp_path / 'nope.tsv'}" in err and "--set" not in err


def test_bleu_segments_chinese_japanese_and_korean_under_their_two_and_three_letter_codes() -> None:
    """Tatoeba names Mandarin `cmn`: scored with 13a, a Chinese sentence would be one unsegmented word."""
    from nmtkit.evaluate import bleu_tokenizer

    for code in ("zh", "zh-Hans", "zh_CN", "cmn", "zho", "yue", "CMN", "lzh", "gan", "hsn", "cjy", "cdo", "czh", "cpx", "mnp"):
        assert bleu_tokenizer(code) == "zh", code
    assert [bleu_tokenizer(c) for c in ("ja", "jpn", "ko", "kor", "en", "deu", "fr")] == ["ja-mecab"] * 2 + ["ko-mecab"] * 2 + ["13a"] * 3


def test_a_pair_longer_than_the_positions_is_left_out_of_the_loss_but_scored_by_bleu(trained_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """BLEU and chrF must score the whole file, as sacrebleu over the same references would; the loss can't read the
    long pair and says so in the table."""
    lines = ["Hello.\t你好。", "Thank you.\t谢谢。", "I like cats.\t我喜欢猫。", " ".join(["word"] * 300) + "\t" + "字" * 300]
    data = tmp_path / "eval.tsv"
    data.write_text("en\tzh\n" + "\n".join(lines) + "\n", encoding="utf-8")
    scored = []
    real = evaluate.quality_metrics
    monkeypatch.setattr(evaluate, "quality_metrics", lambda hyps, refs, bleu: scored.append((len(hyps), len(refs))) or real(hyps, refs, bleu))
    assert main(["evaluate", "--checkpoint", str(trained_run), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert scored == [(4, 4)]
    assert "sentences  3 (1 more, longer than model.max_positions, left out of the loss; BLEU and chrF score them)" in out


def test_a_blank_source_gets_a_blank_hypothesis_for_bleu_as_translate_gives_it(trained_run: Path) -> None:
    """Decoded from </s> alone the model would invent a sentence, and BLEU and chrF would score it."""
    from nmtkit.translator import Translator

    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    hypotheses = evaluate.translate_all(translator, ["", "  ", "Hello.", "\x07"])
    assert hypotheses[0] == hypotheses[1] == hypotheses[3] == "" and hypotheses[2]
    assert [t.translation for t in translator.translate(["", "  "])] == hypotheses[:2]


def test_a_plot_folder_that_cannot_be_written_is_refused_before_the_evaluation(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "afile"
    a_file.write_text("", encoding="utf-8")
    monkeypatch.setattr(evaluate, "teacher_forced_metrics", lambda *a, **k: pytest.fail("evaluated before the check"))
    assert main(["evaluate", "--checkpoint", str(trained_run), "--plot", str(a_file)]) == 2
    assert f"--plot: cannot write {a_file / 'reliability.png'}: {a_file} is not a folder" in capsys.readouterr().err


def test_a_bf16_evaluation_of_the_validation_split_gives_the_loss_training_logged(corpus: dict, tmp_path: Path) -> None:
    """Validation trains' way: fp32 weights under bf16 autocast, not the decoder's bf16 weights."""
    import json

    from conftest import tiny_config
    from nmtkit.device import cpu_has_fast_bf16
    from nmtkit.train import train

    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no bf16 matmuls")
    run = tmp_path / "run"
    train(tiny_config(corpus, run, train={"precision": "bf16", "max_steps": 6, "eval_every": 6, "save_every": 6}))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid_loss = next(r["valid_loss"] for r in logged if "valid_loss" in r)
    result = evaluate.evaluate_checkpoint(str(run), split="valid", precision="bf16", with_bleu=False)
    assert result["loss"] == pytest.approx(valid_loss, abs=1e-6)


def test_evaluate_reads_its_checkpoint_once_for_both_models(trained_run: Path, monkeypatch) -> None:
    """The bf16 decoder and the fp32 scorer come from one read: a run still training may replace best.pt between two."""
    from nmtkit.device import cpu_has_fast_bf16
    from nmtkit.translator import Translator

    if not cpu_has_fast_bf16():
        pytest.skip("this CPU has no bf16 matmuls")
    reads = []
    real = evaluate.load_checkpoint
    monkeypatch.setattr(evaluate, "load_checkpoint", lambda path: reads.append(path) or real(path))
    monkeypatch.setattr(Translator, "from_checkpoint", lambda *a, **k: pytest.fail("a second read"))
    evaluate.evaluate_checkpoint(str(trained_run), split="valid", precision="bf16", with_bleu=False, limit=8)
    assert len(reads) == 1

