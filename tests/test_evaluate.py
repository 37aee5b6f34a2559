"""`nmtkit evaluate`'s choices around the data: a file given on the command line is read as a file, its Arrow cache goes
where the run keeps its own (or the `datasets` cache, never beside a loose checkpoint), and a BLEU tokenizer that
needs missing extras stops the evaluation before any decoding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import pytest

from nmtkit.config import DataConfig
from nmtkit.data import DataError
from nmtkit.evaluate import _cache_dir, bleu_metric, evaluation_data


def test_a_data_file_replaces_the_split_and_is_read_as_a_file_even_for_a_hub_trained_model() -> None:
    hub = DataConfig(hub_name="wmt/wmt14", hub_config="de-en", src_lang="en", tgt_lang="de")
    data = evaluation_data(hub, "test", "mine.tsv")
    assert (data.test, data.hub_name, data.hub_config) == ("mine.tsv", "", "")
    assert evaluation_data(hub, "test", None) is hub  # no file: the run's own split


def test_the_evaluation_cache_is_the_runs_own_or_the_datasets_cache(tmp_path: Path) -> None:
    assert _cache_dir("", tmp_path / "run" / "checkpoints" / "best.pt") == str(tmp_path / "run" / "cache")
    assert _cache_dir("", tmp_path / "model.pt") == str(datasets.config.HF_DATASETS_CACHE)  # not tmp_path/../cache
    assert _cache_dir("/data/arrow", tmp_path / "model.pt") == "/data/arrow"


@pytest.mark.skipif(importlib.util.find_spec("MeCab") is not None, reason="sacrebleu's Japanese extras are installed")
def test_a_japanese_target_without_sacrebleus_extras_is_a_data_error_naming_the_install() -> None:
    with pytest.raises(DataError, match=r"data.tgt_lang 'ja': BLEU's 'ja-mecab' tokenizer needs extra packages.*sacrebleu\[ja\]"):
        bleu_metric("ja")
