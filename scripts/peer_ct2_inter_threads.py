"""CTranslate2 decoding several batches at once (`inter_threads`), beside nmtkit's decoding workers.

The peers' script (../shared/bench/bench_ct2.py) measures CTranslate2 one batch at a time (`inter_threads=1`).
nmtkit decodes one batch per core on CPU (decode.workers), and CTranslate2 has the same option, so this measures it
on the same work: the peers' converted random-weight Marian model, their 8 fixed batches of 64 test sentences,
exactly 48 new tokens, int8, every batch submitted with `asynchronous=True`. Prints one JSON line per setting.

    PEER_BENCH_DIR=peer-bench /tmp/peer-venv/bin/python scripts/peer_ct2_inter_threads.py 1,1 2,1 1,2   # inter,intra

Runs in the peers' environment (ctranslate2, sentencepiece), after ../shared/bench/run_all.sh has converted the model.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "bench"))
import bench_ct2  # noqa: E402  (the peers' helpers: tokenizer path, id -> piece conversion)
import common  # noqa: E402
import ctranslate2  # noqa: E402
import sentencepiece as spm  # noqa: E402


def main(settings: list[str]) -> None:
    sp = spm.SentencePieceProcessor(model_file=bench_ct2.SPM)
    model_dir = os.path.join(common.BENCH, "ckpt", "hf_marian_random_ct2")
    batches = [bench_ct2.ids_to_pieces(sp, s) for s in common.load_batches()["test_decode"]]
    options = dict(beam_size=1, min_decoding_length=48, max_decoding_length=48, max_batch_size=64)
    for setting in settings:
        inter, intra = map(int, setting.split(","))
        translator = ctranslate2.Translator(model_dir, device="cpu", compute_type="int8", intra_threads=intra, inter_threads=inter)
        translator.translate_batch(batches[0], **options)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jobs = [translator.translate_batch(b, asynchronous=True, **options) for b in batches]
            n_sentences = sum(len(job) for job in jobs)
            for job in jobs:
                for result in job:
                    result.result()
            times.append(time.perf_counter() - t0)
        print(json.dumps({
            "system": f"ctranslate2 {ctranslate2.__version__} int8 inter_threads={inter} intra_threads={intra}",
            "sent_per_s": n_sentences / statistics.median(times), "runs_s": [round(t, 3) for t in times],
        }), flush=True)
        del translator


if __name__ == "__main__":
    main(sys.argv[1:] or ["1,1", "2,1"])
