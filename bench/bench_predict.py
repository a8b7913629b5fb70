"""predict's end-to-end images/s against the same backend's batch-32 throughput, in one run.

    flock /tmp/tl_deploy.bench.lock python bench/bench_predict.py --threads 2

End to end is ``tl_deploy.predict.run_predictions`` over every image file of the split, loaded as
``predict`` loads it (its inference streams): decoding and preprocessing in its thread pool,
inference, top-k, and the JSONL rows flushed and fsynced per batch (model loading excluded). The
reference is ``tl_deploy.bench``'s own timing of ``Classifier.infer`` on a preprocessed batch of 32,
the same file on the same backend loaded as ``tl-deploy bench`` loads it (one stream), timed just
before and just after each pass: the ratio of a pass is its images/s over the mean of the two, and
the median ratio over the passes is reported. Target: end to end >= 80% of the reference.

Where the time goes, measured in the same run: the batch of 32 on predict's streams at once (against
the one-stream reference, side by side), decoding alone on one thread (the reference
``preprocess.prepare`` image by image, and ``preprocess.prepare_batch`` that predict uses), and the
pipeline without decoding (``predicted_rows`` and the JSONL writer over batches decoded beforehand):
the ceiling of the ratio whatever the decoding costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tl_deploy.bench import BenchConfig, interleaved
from tl_deploy.predict import (
    LineWriter,
    collect_inputs,
    decode_batch,
    default_streams,
    default_workers,
    predicted_rows,
    run_predictions,
)
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
    p.add_argument("--streams", type=int, default=None,
                   help="predict's inference streams (default: predict's own); the reference runs 1")
    p.add_argument("--workers", type=int, default=None,
                   help="predict's decoding threads (default: predict's own; 0: on the inference thread)")
    p.add_argument("--runs", type=int, default=7,
                   help="end-to-end passes over the split, each timed between two batch-32 timings (median ratio)")
    p.add_argument("--seconds", type=float, default=0.5, help="seconds of each batch-32 timing")
    args = p.parse_args()

    paths = collect_inputs([str(args.data)])
    streams = args.streams or default_streams(args.threads)
    options = dict(backend=args.backend, precision=args.precision, threads=args.threads)
    with load(args.model, **options) as ref, load(args.model, **options, streams=streams) as clf:
        workers = args.workers if args.workers is not None else default_workers(clf.device, args.threads)
        batch = np.stack([prepare(path, clf.spec) for path in paths[:BATCH]])  # (32, 3, H, W)
        config = BenchConfig(batches=(BATCH,), rounds=1, seconds=args.seconds)

        def reference() -> float:  # tl_deploy.bench's timing of one stream, as `tl-deploy bench` loads it
            return interleaved({"infer": lambda: ref.infer(batch)}, BATCH, config)["infer"].images_per_s

        def on_streams(calls: int = 64) -> float:  # the same batch on every stream at once (predict's classifier)
            with ThreadPoolExecutor(clf.streams) as pool:
                start = time.perf_counter()
                list(pool.map(lambda _: [clf.infer(batch) for _ in range(calls // clf.streams)],
                              range(clf.streams)))
                return BATCH * (calls // clf.streams) * clf.streams / (time.perf_counter() - start)

        reference()  # warm-up
        on_streams()
        stream_ratios = []
        for _ in range(5):
            before = reference()
            rate = on_streams()
            stream_ratios.append(rate / statistics.mean([before, reference()]))
        refs, e2e, ratios = [], [], []
        with tempfile.TemporaryDirectory(prefix="bench_predict.") as tmp:
            for run in range(args.runs):  # each pass between two reference timings: side by side
                before = reference()
                writer = LineWriter(Path(tmp) / f"run{run}.jsonl", top_k=5)
                start = time.perf_counter()
                summary = run_predictions(clf, paths, writer, top_k=5, batch_size=BATCH, workers=workers,
                                          progress=False)
                writer.close()
                e2e.append(len(paths) / (time.perf_counter() - start))
                assert summary.written == len(paths) and summary.errors == 0
                after = reference()
                refs.append((before, after))
                ratios.append(e2e[-1] / statistics.mean([before, after]))
            chunks = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]
            decode_ref = best_seconds(lambda: [np.stack([prepare(p, clf.spec) for p in c]) for c in chunks])
            out = np.empty((BATCH, *batch.shape[1:]), dtype=np.float32)
            decode_fast = best_seconds(lambda: [prepare_batch(c, clf.spec, out) for c in chunks])
            decoded = [decode_batch(c, clf.spec) for c in chunks]

            def no_decode() -> None:
                writer = LineWriter(Path(tmp) / f"no-decode-{time.perf_counter_ns()}.jsonl", top_k=5)
                for rows in predicted_rows(clf, decoded, 5):
                    writer.write(rows)
                writer.close()

            ceiling = len(paths) / best_seconds(no_decode)
        backend, precision = clf.backend_name, clf.precision
    reference_all = statistics.median([r for pair in refs for r in pair])
    print(f"model {args.model}, {backend} {precision}, {args.threads} threads, {workers} decode workers, "
          f"{clf.streams} inference streams (reference: 1), {len(paths)} images of {args.data}")
    for (before, after), rate, ratio in zip(refs, e2e, ratios):
        print(f"  batch-32 infer {before:.1f} / {after:.1f} images/s (before / after) | predict end to end "
              f"{rate:.1f} images/s | {ratio:.1%}")
    print(f"ratio: median {statistics.median(ratios):.1%} of batch-32 throughput over {args.runs} passes "
          f"(range {min(ratios):.1%}-{max(ratios):.1%}; target >= 80%)")
    low, high = min(stream_ratios), max(stream_ratios)
    print(f"batch-32 infer on {clf.streams} streams at once, no decoding: median "
          f"{statistics.median(stream_ratios):.2f}x the one-stream reference (5 rounds, range {low:.2f}x-{high:.2f}x)")
    print(f"decoding alone, one thread: prepare {decode_ref / len(paths) * 1e3:.3f} ms/image, prepare_batch "
          f"{decode_fast / len(paths) * 1e3:.3f} ms/image")
    print(f"predict without decoding (batches decoded beforehand, {clf.streams} streams): {ceiling:.1f} images/s = "
          f"{ceiling / reference_all:.1%} of batch-32 throughput (median of all reference timings); end to end "
          f"is {statistics.median(e2e) / ceiling:.1%} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
