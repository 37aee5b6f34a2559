"""benchmark.py's decoding measurement: the runs with and without the per-token log alternate, so that a machine
that slows down during the measurement weighs on both figures alike (their ratio is the log's overhead)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from nmtkit import benchmark
from nmtkit.device import choose_runtime


def test_decoding_runs_alternate_between_plain_and_logged(monkeypatch) -> None:
    top_ks: list[int] = []

    def fake_decode(model, src, new_tokens, *, top_k, stop_at_eos, static):
        top_ks.append(top_k)
        return SimpleNamespace(tokens=torch.zeros(src.size(0), new_tokens), lengths=torch.full((src.size(0),), new_tokens))

    monkeypatch.setattr(benchmark, "greedy_decode", fake_decode)
    monkeypatch.setattr(benchmark, "for_inference", lambda model, runtime: model)
    monkeypatch.setattr(benchmark, "map_batches", lambda fn, sources, workers, processes: [fn(s) for s in sources])
    settings = benchmark.BenchmarkSettings(repeats=3, new_tokens=4)
    result = benchmark.benchmark_decoding(torch.nn.Linear(1, 1), choose_runtime("cpu", "fp32"), [torch.ones(2, 5)], settings, workers=1)
    assert top_ks == [0, 0, 5, 0, 5, 0, 5]  # a warm-up, then plain and logged in turn
    assert result["decode_sentences"] == 2 and result["decode_tokens_per_s"] > 0
