"""Where the fused one-launch CUDA BatchNorm kernels pay: `python -m benchmarks.fused_threshold`.

Times fastbn's training forward+backward as CUDA-graph replays (the GPU's time alone) at shapes
either side of the fused kernels' limit, once as built and once with FASTBN_CUDA_FUSED_VALUES=0
(the split reduce / finalize / elementwise kernels everywhere), each in its own process since the
limit is read once; torch's time beside them. Prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

# (shape, channels_last): values per channel from 64 to 40000; rows layouts with few and many channels
SHAPES = [((64, 64, 1, 1), False), ((40, 64, 5, 5), False), ((33, 64, 11, 11), False), ((32, 64, 16, 16), False),
          ((33, 64, 22, 22), False), ((32, 64, 32, 32), False), ((32, 256, 8, 8), False), ((32, 64, 16, 16), True),
          ((32, 256, 8, 8), True), ((40, 64, 5, 5), True), ((200, 1000), False), ((1000, 1000), False),
          ((4096, 256), False)]


def name(shape, cl):
    return "x".join(map(str, shape)) + (" channels_last" if cl else "")


def measure(rounds, min_run_time):
    from benchmarks.harness import cuda_graphed, medians, time_rounds
    from benchmarks.run import bn_case

    out = {}
    for shape, cl in SHAPES:
        fns = bn_case(shape, torch.float32, torch.device("cuda"), cl, "fwd+bwd")[0]
        graphs = {side: cuda_graphed(fn) for side, fn in fns.items()}
        out[name(shape, cl)] = medians(time_rounds(graphs, 1, rounds, min_run_time))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.02)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fused_threshold needs CUDA")
    if args.child:
        print(json.dumps(measure(args.rounds, args.min_run_time)))
        return
    runs = {}
    for label, env in (("as built", {}), ("split (limit 0)", {"FASTBN_CUDA_FUSED_VALUES": "0"})):
        cmd = [sys.executable, "-m", "benchmarks.fused_threshold", "--child", "--rounds", str(args.rounds),
               "--min-run-time", str(args.min_run_time)]
        res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        runs[label] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"fastbn training fwd+bwd, float32, CUDA-graph replay, us ({torch.cuda.get_device_name()})\n")
    print("| case | fastbn as built | fastbn split | split / as built | torch |")
    print("|---|---|---|---|---|")
    for case in runs["as built"]:
        built, split = runs["as built"][case], runs["split (limit 0)"][case]
        print(f"| {case} | {1e6 * built['fastbn']:.1f} | {1e6 * split['fastbn']:.1f} | "
              f"{split['fastbn'] / built['fastbn']:.2f}x | {1e6 * built['torch']:.1f} |")


if __name__ == "__main__":
    main()
