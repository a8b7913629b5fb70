"""Time the frozen layers' inference passes on PyTorch eager and on onnxruntime, side by side.

These are the one-off passes of the default lp-ft run before its epochs: the first stages' outputs of
every train and val image, and the probe's features computed from them. Both runtimes get the same
inputs in interleaved rounds (so load hits them alike) and the same thread count.

    python bench/bench_frozen.py [--model efficientnet_lite0] [--img-size 112] [--unfreeze 4]

Prints ms per image for each pass and runtime, the speed-up, and the largest output difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tl_deploy.backbones import backbone_stages, create_model, cut_after_stages
from tl_deploy.train.stage_cache import frozen_forward

CPU = torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--unfreeze", type=int, default=4, help="stages that train; the others form the frozen prefix")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    weights = "embedded" if args.model == "efficientnet_lite0" else "none"
    model = create_model(args.model, num_classes=10, weights=weights).eval()
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    split = cut_after_stages(model, len(backbone_stages(model)) - args.unfreeze)
    if split is None:
        raise SystemExit(f"{args.model} cannot be cut before its last {args.unfreeze} stages")
    prefix, suffix = split
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)  # (B, 3, H, W)
    with torch.no_grad():
        h = prefix.eval()(x)  # (B, C, h, w)

    def features(m: torch.nn.Module, a: torch.Tensor) -> torch.Tensor:
        return m(a, pre_logits=True)

    passes = {
        "frozen-stage outputs": {rt: frozen_forward(prefix, x[:1], runtime=rt, device=CPU)
                                 for rt in ("torch", "onnxruntime")},
        "probe features": {rt: frozen_forward(suffix, h[:1], runtime=rt, device=CPU, call=features)
                           for rt in ("torch", "onnxruntime")},
    }
    inputs = {"frozen-stage outputs": x, "probe features": h}
    print(f"{args.model} at {args.img_size} px, last {args.unfreeze} stages train, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"{'pass':<22} {'torch ms/img':>13} {'onnxruntime ms/img':>19} {'speed-up':>9} {'max abs diff':>13}")
    for name, runners in passes.items():
        inp = inputs[name]
        outs = {rt: fn(inp) for rt, fn in runners.items()}  # warm-up, and the outputs compared
        times: dict[str, list[float]] = {rt: [] for rt in runners}
        ratios = []
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for rt in order:
                start = time.perf_counter()
                runners[rt](inp)
                times[rt].append(time.perf_counter() - start)
            ratios.append(times["torch"][-1] / times["onnxruntime"][-1])
        ms = {rt: statistics.median(t) / len(inp) * 1e3 for rt, t in times.items()}
        diff = float((outs["torch"] - outs["onnxruntime"]).abs().max())
        print(f"{name:<22} {ms['torch']:>13.2f} {ms['onnxruntime']:>19.2f} "
              f"{statistics.median(ratios):>8.2f}x {diff:>13.2e}")


if __name__ == "__main__":
    main()
