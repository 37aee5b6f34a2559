"""benchmark.py's decoding measurement: the runs with and without the per-token log alternate, each first in turn, so
that a machine that slows down during the measurement weighs on both figures alike; the log's overhead is the ratio
of their medians."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nmtkit import benchmark
from nmtkit.device import choose_runtime


def test_decoding_runs_alternate_between_plain_and_logged_and_time_each(monkeypatch: pytest.MonkeyPatch) -> None:
    top_ks: list[int] = []
    clock = [0.0]

    def fake_decode(model, src, new_tokens, *, top_k, stop_at_eos, static):
        top_ks.append(top_k)
        clock[0] += 1.25 if top_k else 1.0  # the logged run costs 25% more
        return SimpleNamespace(tokens=torch.zeros(src.size(0), new_tokens), lengths=torch.full((src.size(0),), new_tokens))

    monkeypatch.setattr(benchmark, "greedy_decode", fake_decode)
    monkeypatch.setattr(benchmark, "for_inference", lambda model, runtime: model)
    monkeypatch.setattr(benchmark, "map_batches", lambda fn, sources, workers, processes: [fn(s) for s in sources])
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: clock[0])
    settings = benchmark.BenchmarkSettings(repeats=3, new_tokens=4)
    result = benchmark.benchmark_decoding(torch.nn.Linear(1, 1), choose_runtime("cpu", "fp32"), [torch.ones(2, 5)], settings, workers=1)
    assert top_ks == [0, 0, 5, 5, 0, 0, 5]  # a warm-up, then plain and logged pairs, each first in turn
    assert result["decode_log_overhead"] == pytest.approx(0.25)
    assert result["decode_sent_per_s"] == pytest.approx(2.0) and result["decode_sent_per_s_with_log"] == pytest.approx(1.6)
