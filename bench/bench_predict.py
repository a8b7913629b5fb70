"""predict's end-to-end images/s against the same backend's batch-32 throughput, in one run.

    flock /tmp/tl_deploy.bench.lock python bench/bench_predict.py --threads 2

End to end is ``tl_deploy.predict.run_predictions`` over every image file of the split: decoding and
preprocessing in its thread pool, inference, top-k, and the JSONL rows flushed and fsynced per batch
(model loading excluded). The reference is ``tl_deploy.bench``'s own timing of ``Classifier.infer`` on a
preprocessed batch of 32, with the same classifier. Target: end to end >= 80% of the reference.

Where the time goes, measured in the same run: decoding alone on one thread (the reference
``preprocess.prepare`` image by image, and ``preprocess.prepare_batch`` that predict uses), and the
pipeline without decoding (``predict_batch`` and the JSONL writer over batches decoded beforehand): the
ceiling of the ratio whatever the decoding costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tl_deploy.bench import BenchConfig, interleaved
from tl_deploy.predict import LineWriter, collect_inputs, decode_batch, default_workers, predict_batch, run_predictions
from tl_deploy.preprocess import prepare, prepare_batch
from tl_deploy.runtime import load

BATCH = 32


def best_seconds(fn: Callable[[], object], repeat: int = 3) -> float:
    """The fastest of ``repeat`` timed calls (the least disturbed one)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path("export/animal-shape-efficientnet_lite0-lp-ft"))
    p.add_argument("--data", type=Path, default=Path("data/animal-shape/test"), help="the image files predicted")
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=None,
                   help="predict's decoding threads (default: predict's own; 0: on the inference thread)")
    p.add_argument("--runs", type=int, default=3, help="end-to-end passes over the split (median reported)")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the batch-32 timing")
    args = p.parse_args()

    paths = collect_inputs([str(args.data)])
    with load(args.model, backend=args.backend, precision=args.precision, threads=args.threads) as clf:
        workers = args.workers if args.workers is not None else default_workers(clf.device, args.threads)
        batch = np.stack([prepare(path, clf.spec) for path in paths[:BATCH]])  # (32, 3, H, W)
        config = BenchConfig(batches=(BATCH,), rounds=args.rounds, seconds=0.5)
        before = interleaved({"infer": lambda: clf.infer(batch)}, BATCH, config)["infer"].images_per_s
        e2e = []
        with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
            for run in range(args.runs):
                writer = LineWriter(Path(tmp) / f"run{run}.jsonl", top_k=5)
                start = time.perf_counter()
                summary = run_predictions(clf, paths, writer, top_k=5, batch_size=BATCH, workers=workers,
                                          progress=False)
                writer.close()
                e2e.append(len(paths) / (time.perf_counter() - start))
                assert summary.written == len(paths) and summary.errors == 0
            chunks = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]
            decode_ref = best_seconds(lambda: [np.stack([prepare(p, clf.spec) for p in c]) for c in chunks])
            out = np.empty((BATCH, *batch.shape[1:]), dtype=np.float32)
            decode_fast = best_seconds(lambda: [prepare_batch(c, clf.spec, out) for c in chunks])
            decoded = [decode_batch(c, clf.spec) for c in chunks]

            def no_decode() -> None:
                writer = LineWriter(Path(tmp) / f"no-decode-{time.perf_counter_ns()}.jsonl", top_k=5)
                for b in decoded:
                    writer.write(predict_batch(clf, b, 5))
                writer.close()

            ceiling = len(paths) / best_seconds(no_decode)
        after = interleaved({"infer": lambda: clf.infer(batch)}, BATCH, config)["infer"].images_per_s
        backend, precision = clf.backend_name, clf.precision
    reference = statistics.median([before, after])
    predict = statistics.median(e2e)
    print(f"model {args.model}, {backend} {precision}, {args.threads} threads, {workers} decode workers, "
          f"{len(paths)} images of {args.data}")
    print(f"batch-32 infer (tl_deploy.bench timing, before/after): {before:.1f} / {after:.1f} images/s")
    print(f"predict end to end, {args.runs} runs: {', '.join(f'{v:.1f}' for v in e2e)} images/s "
          f"(median {predict:.1f})")
    print(f"ratio: {predict / reference:.1%} of batch-32 throughput (target >= 80%)")
    print(f"decoding alone, one thread: prepare {decode_ref / len(paths) * 1e3:.3f} ms/image, prepare_batch "
          f"{decode_fast / len(paths) * 1e3:.3f} ms/image")
    print(f"predict without decoding (batches decoded beforehand): {ceiling:.1f} images/s = "
          f"{ceiling / reference:.1%} of batch-32 throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
