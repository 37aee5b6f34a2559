"""Decoding workers (decode_workers.py): several batches decoded at once on CPU give the same translations, in
input order, as one batch at a time, and leave torch's thread count as they found it."""

from __future__ import annotations

import os
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import nmtkit.forked_map
from conftest import read_pairs
from nmtkit.benchmark import BenchmarkSettings, benchmark_decoding
from nmtkit.cli import main
from nmtkit.config import ConfigError, config_from_tree
from nmtkit.decode_workers import length_sorted_batches, map_batches, resolve_workers, uses_processes
from nmtkit.device import choose_runtime
from nmtkit.evaluate import translate_all
from nmtkit.forked_map import fork_available
from nmtkit.translator import Translator
from test_forked_map import pid_threads_and_square, pid_threads_and_square_slowly

BUNDLED_TEST = Path(__file__).resolve().parents[1] / "data" / "tatoeba-en-zh" / "test.jsonl"


def test_map_batches_in_threads_keeps_input_order_and_gives_each_worker_one_intra_op_thread() -> None:
    seen: dict[int, tuple[int, str]] = {}

    def fn(i: int) -> int:
        seen[i] = (torch.get_num_threads(), threading.current_thread().name)
        return i * i

    torch.set_num_threads(2)
    assert map_batches(fn, list(range(7)), workers=2, processes=False) == [i * i for i in range(7)]
    assert {threads for threads, _ in seen.values()} == {1}
    assert all(name.startswith("nmtkit-decode") for _, name in seen.values())
    assert torch.get_num_threads() == 2


def test_processes_are_not_used_with_fewer_workers_than_threads_other_caller_threads_or_without_linux(monkeypatch) -> None:
    # GNU OpenMP's pool does not survive a fork: a forked worker must run one thread, so 2 workers on 4 threads
    # are threads of this process (each with 2 intra-op threads)
    torch.set_num_threads(4)
    try:
        results = map_batches(pid_threads_and_square, [0, 1, 2], workers=2)
        assert {(pid, threads) for pid, threads, _ in results} == {(os.getpid(), 2)}
    finally:
        torch.set_num_threads(2)
    # a caller with other threads (a server translating from several at once) does not fork: one of them could hold
    # a lock inside torch that the child would wait for forever
    torch.set_num_threads(2)
    done = threading.Event()
    other = threading.Thread(target=done.wait)
    other.start()
    try:
        assert {pid for pid, _, _ in map_batches(pid_threads_and_square, [0, 1, 2], workers=2)} == {os.getpid()}
    finally:
        done.set()
        other.join()
    if fork_available():  # the caller and a forked helper
        assert len({pid for pid, _, _ in map_batches(pid_threads_and_square_slowly, [0, 1, 2], workers=2)}) == 2
    monkeypatch.setattr(nmtkit.forked_map, "sys", types.SimpleNamespace(platform="darwin"))  # this module's view only
    assert not fork_available()
    assert {pid for pid, _, _ in map_batches(pid_threads_and_square, [0, 1, 2], workers=2)} == {os.getpid()}


def test_map_batches_with_one_worker_or_one_batch_runs_on_the_calling_thread() -> None:
    caller = threading.current_thread().name
    names = map_batches(lambda _: threading.current_thread().name, [0, 1, 2], workers=1)
    assert names == [caller] * 3
    assert map_batches(lambda _: threading.current_thread().name, [0], workers=4) == [caller]


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_an_error_in_one_batch_reaches_the_caller_and_the_thread_count_is_restored(processes: bool) -> None:
    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("batch 3 is bad")
        return i

    torch.set_num_threads(2)
    assert uses_processes(2, processes) == (processes and fork_available())
    with pytest.raises(ValueError, match="batch 3 is bad"):
        map_batches(fn, list(range(6)), workers=2, processes=processes)
    assert torch.get_num_threads() == 2


def test_length_sorted_batches_group_similar_lengths_and_cover_every_index_once() -> None:
    texts = ["a much longer sentence here", "hi", "medium one", "yo", "the longest sentence of them all, by far", "ok"]
    batches = length_sorted_batches(texts, 2)
    assert batches == [[1, 3], [5, 2], [0, 4]]  # "hi", "yo", "ok" tie at 2 characters and keep their order
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    assert length_sorted_batches([], 4) == []


def test_translate_returns_input_order_from_length_sorted_batches(trained_run: Path) -> None:
    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    translator.cfg.decode.batch_size = 2
    texts = sorted(_sentences(6), key=len, reverse=True)  # longest first: every batch is reordered
    assert [t.source for t in translator.translate(texts)] == texts
    one_by_one = [translator.translate([text])[0].translation for text in texts]
    assert [t.translation for t in translator.translate(texts)] == one_by_one


def test_auto_workers_are_one_per_cpu_thread_up_to_eight_and_one_on_gpus(monkeypatch) -> None:
    torch.set_num_threads(2)
    assert resolve_workers(0, torch.device("cpu")) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert resolve_workers(0, torch.device("cpu")) == 8
    assert resolve_workers(16, torch.device("cpu")) == 16  # asked for: not capped
    assert resolve_workers(3, torch.device("cpu")) == 3
    assert resolve_workers(0, torch.device("cuda")) == 1
    assert resolve_workers(4, torch.device("cuda")) == 1


def test_negative_decode_workers_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="decode.workers"):
        config_from_tree({"decode": {"workers": -1}})


def _sentences(n: int) -> list[str]:
    return [pair["translation"]["en"] for pair in read_pairs(BUNDLED_TEST, n)]


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_translations_with_two_workers_equal_one_worker_token_for_token(trained_run: Path, monkeypatch, tmp_path: Path, processes: bool) -> None:
    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    translator.cfg.decode.batch_size = 3  # 10 sentences: 4 batches, the last one short
    texts = _sentences(10)
    translator.cfg.decode.workers = 1
    # on one thread, as each worker runs: the step's attention then takes nmtkit's kernel there too (with more
    # threads it runs on torch's ops, whose sums round differently in the last bits)
    torch.set_num_threads(1)
    one = translator.translate(texts)
    where = tmp_path / "where.txt"  # a file, so that forked helpers can report too
    decode_batch = translator._decode_batch
    caller = os.getpid()

    def recording(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with where.open("a") as f:
            f.write(f"{os.getpid()} {threading.current_thread().name}\n")
        if os.getpid() == caller and processes:
            time.sleep(0.3)  # so that the helper decodes some of the batches
        return decode_batch(*args, **kwargs)

    monkeypatch.setattr(translator, "_decode_batch", recording)
    torch.set_num_threads(2)
    translator.cfg.decode.workers = 2
    translator.cfg.decode.processes = processes
    two = translator.translate(texts)
    calls = [line.split() for line in where.read_text().splitlines()]
    assert len(calls) == 4
    if processes and fork_available():  # the caller and one forked helper, each on its main thread
        assert len({pid for pid, _ in calls}) == 2 and {name for _, name in calls} == {"MainThread"}
    else:
        assert all(int(pid) == os.getpid() and name.startswith("nmtkit-decode") for pid, name in calls)  # not the calling thread
    assert [t.source for t in two] == texts
    assert [[s.id for s in t.tokens] for t in two] == [[s.id for s in t.tokens] for t in one]
    assert [[s.prob for s in t.tokens] for t in two] == [[s.prob for s in t.tokens] for t in one]
    assert translate_all(translator, texts) == [t.translation for t in one]


def test_cli_workers_flag_overrides_the_run_and_rejects_negative_values(trained_run: Path, capsys, monkeypatch) -> None:
    import nmtkit.decode_workers

    used = []

    def recording(fn, batches, workers, processes):  # noqa: ANN001, ANN202
        used.append(workers)
        return map_batches(fn, batches, workers, processes)

    monkeypatch.setattr(nmtkit.decode_workers, "map_batches", recording)
    texts = _sentences(4)
    assert main(["translate", "--checkpoint", str(trained_run), "--batch-size", "1", "--workers", "3", *texts]) == 0
    with_workers = capsys.readouterr().out
    assert main(["translate", "--checkpoint", str(trained_run), "--batch-size", "1", "--workers", "1", *texts]) == 0
    assert capsys.readouterr().out == with_workers
    assert used == [3, 1]
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", "--checkpoint", str(trained_run), "--workers", "-1", "Hello."])
    assert exit_info.value.code == 2
    assert "--workers: expected a whole number >= 0, got '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("processes", [True, False], ids=["processes", "threads"])
def test_benchmark_decoding_reports_its_workers(trained_run: Path, monkeypatch, processes: bool) -> None:
    import nmtkit.benchmark

    asked = []

    def recording(fn, batches, workers, processes):  # noqa: ANN001, ANN202
        asked.append((workers, processes))
        return map_batches(fn, batches, workers, processes)

    monkeypatch.setattr(nmtkit.benchmark, "map_batches", recording)
    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    sources = [translator.encode_source(_sentences(4)[i : i + 2]) for i in (0, 2)]
    settings = BenchmarkSettings(repeats=1, new_tokens=3)
    torch.set_num_threads(2)
    result = benchmark_decoding(translator.model, choose_runtime("cpu", "fp32"), sources, settings, workers=2, processes=processes)
    assert set(asked) == {(2, processes)}
    assert result["decode_workers"] == 2 and result["decode_processes"] == (processes and fork_available())
    assert result["decode_tokens_per_s"] > 0 and result["decode_sentences"] == 4


def test_a_batch_scored_against_references_sends_back_no_logits(trained_run: Path) -> None:
    # a helper pickles each batch's tensors back to the caller: the (B, T, V) reference logits, unused there, must
    # not travel with them (a [:0] view of them would still pickle their whole storage)
    import pickle

    translator = Translator.from_checkpoint(trained_run, "cpu", "fp32")
    texts = _sentences(4)
    decoded = translator._decode_batch(texts, texts, 5, 1, 1, 1.0)
    assert decoded.scores is not None and decoded.scores.logits.numel() == 0
    full_logits = decoded.scores.probs.numel() * translator.tokenizer.tgt_vocab_size * 4
    assert len(pickle.dumps(decoded)) < full_logits / 4
