"""Per-kernel GPU time of fastbn and torch at the benchmark's key cases:
`python -m benchmarks.profile_kernels [--iters 20]`.

Where benchmarks.run says how long a whole step takes, this says which kernels the time goes to
(torch.profiler device times, averaged per step), so that a slow case points at its kernel.
"""
import argparse

import torch

from benchmarks.run import bn_case, linear_case

CASES = [
    ("BatchNorm 128x64x32x32 fwd+bwd", lambda d: bn_case((128, 64, 32, 32), torch.float32, d, False, "fwd+bwd")[0]),
    ("BatchNorm 128x64x32x32 channels_last fwd+bwd",
     lambda d: bn_case((128, 64, 32, 32), torch.float32, d, True, "fwd+bwd")[0]),
    ("BatchNorm 32x256x8x8 fwd+bwd", lambda d: bn_case((32, 256, 8, 8), torch.float32, d, False, "fwd+bwd")[0]),
    ("BatchNorm 200x1000 fwd+bwd", lambda d: bn_case((200, 1000), torch.float32, d, False, "fwd+bwd")[0]),
    ("Linear+LReLU 200x3072->100 fwd+bwd", lambda d: linear_case(200, 3072, 100, torch.float32, d, True)[0]),
]


def device_time_us(event):
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr):
            return getattr(event, attr)
    return 0.0


def profile(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(device_time_us(e) / iters, e.count / iters, e.key) for e in prof.key_averages()
            if device_time_us(e) > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")]
    return sorted(rows, reverse=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_kernels needs CUDA (it reads GPU kernel times)")
    device = torch.device("cuda")
    for title, make in CASES:
        for side, fn in make(device).items():
            rows = profile(fn, args.iters)
            print(f"\n== {title} | {side}: {sum(r[0] for r in rows):.1f} us of kernels per step")
            for us, count, name in rows:
                print(f"  {us:9.1f} us  x{count:4.1f}  {name[:110]}")


if __name__ == "__main__":
    main()
