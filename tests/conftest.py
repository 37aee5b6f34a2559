"""Shared fixtures: a small slice of the bundled corpus, a tiny config, and one trained tiny run.

Everything is written under pytest's temporary directories, so tests never touch checkpoints/.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nmtkit.config import Config, config_from_tree

ROOT = Path(__file__).parents[1]
BUNDLED = ROOT / "data" / "tatoeba-en-zh"


def read_pairs(path: Path, n: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """600 training pairs and 40 valid/test pairs of the real English-Chinese corpus."""
    d = tmp_path_factory.mktemp("corpus")
    return {
        "train": write_jsonl(d / "train.jsonl", read_pairs(BUNDLED / "train.jsonl", 600)),
        "valid": write_jsonl(d / "valid.jsonl", read_pairs(BUNDLED / "valid.jsonl", 40)),
        "test": write_jsonl(d / "test.jsonl", read_pairs(BUNDLED / "test.jsonl", 40)),
    }


def tiny_tree(corpus: dict[str, Path], run_dir: Path, **sections: dict) -> dict:
    """A config tree for a model that trains in seconds on CPU."""
    tree = {
        "data": {"train": str(corpus["train"]), "valid": str(corpus["valid"]), "test": str(corpus["test"]), "max_len": 64},
        "tokenizer": {"vocab_size": 1200},  # the corpus supports fewer; SentencePiece shrinks it
        "model": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_enc_layers": 1, "n_dec_layers": 1, "max_positions": 128},
        "train": {
            "run_dir": str(run_dir), "device": "cpu", "precision": "fp32", "max_tokens": 512, "lr": 3e-3,
            "warmup_steps": 5, "max_steps": 12, "eval_every": 6, "save_every": 6, "log_every": 3, "progress_bar": False,
        },
        "decode": {"batch_size": 16, "top_k": 3},
    }
    for section, values in sections.items():
        tree[section].update(values)
    return tree


def tiny_config(corpus: dict[str, Path], run_dir: Path, **sections: dict) -> Config:
    return config_from_tree(tiny_tree(corpus, run_dir, **sections))


@pytest.fixture(scope="session")
def trained_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run trained once for the tests that translate, evaluate or load checkpoints."""
    from nmtkit.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(corpus, run_dir))
    return run_dir


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """For tests of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second thread only adds
    waiting, and on a busy machine a lot of it (6x measured on 2 shared cores). Restored afterwards, for the session
    fixtures other tests build."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _denormals_back_on():
    """A CPU runtime flushes denormal floats to zero for the whole process (`device.choose_runtime`);
    restore IEEE behaviour after each test, since other tests (hypothesis's float strategies) need it."""
    yield
    torch.set_flush_denormal(False)
