"""Timing and roofline arithmetic shared by the benchmarks.

Every comparison times the candidates in the same process, interleaved round by round
(A, B, A, B, ...), each round a torch.utils.benchmark median with the thread count set
explicitly; the reported time is the median over rounds. Achieved bandwidth and FLOP rates are
set against a copy bandwidth and a matmul rate measured on the same device in the same run.
"""
import statistics

import torch
from torch.utils import benchmark

# ---- what each case moves or computes (unit-tested) -------------------------------------------


def batch_norm_bytes(numel, itemsize, training, backward):
    """The least memory traffic BatchNorm can have: each tensor read or written once.

    forward: read x, write y                                      -> 2 passes
    backward: read x and dy, write dx (x is needed for the weight
    gradient, and for dx in training)                              -> +3
    A two-phase kernel (statistics, then the elementwise pass) reads x once more in each
    direction when the data does not stay in cache; that is a cost, not work, so it is not counted.
    """
    passes = 2 + (3 if backward else 0)
    return passes * numel * itemsize


def linear_flops(rows, in_features, out_features, backward, input_grad=True):
    """2*M*K*N for the forward GEMM; the backward adds the weight GEMM and, if asked, the input GEMM."""
    gemm = 2 * rows * in_features * out_features
    return gemm * (1 + (1 + int(input_grad) if backward else 0))


# ---- measurement -------------------------------------------------------------------------------


def time_rounds(fns, threads, rounds=5, min_run_time=0.2):
    """{name: [seconds in each round]} for callables timed alternately in `rounds` rounds."""
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
            per[name].append(t.blocked_autorange(min_run_time=min_run_time).median)
    return per


def medians(per_round):
    """{name: median seconds over rounds} of time_rounds' result."""
    return {name: statistics.median(v) for name, v in per_round.items()}


def time_interleaved(fns, threads, rounds=5, min_run_time=0.2):
    """{name: median seconds over rounds} for callables timed alternately."""
    return medians(time_rounds(fns, threads, rounds, min_run_time))


def round_ratios(per_round, num="torch", den="fastbn"):
    """(median, lowest, highest) of num/den over the rounds. Both sides of a round are timed back
    to back, so each round's ratio is paired against the machine's drift between rounds, and the
    spread shows how much it moved during the comparison."""
    ratios = [a / b for a, b in zip(per_round[num], per_round[den])]
    return statistics.median(ratios), min(ratios), max(ratios)


def copy_bandwidth(device, threads, nbytes=256 << 20, rounds=3):
    """Achieved bytes/s of dst.copy_(src), read + write counted, on a buffer larger than the caches."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, threads, rounds)["copy"]
    return 2 * n * 4 / t


def matmul_rate(device, threads, n=2048, dtype=torch.float32, rounds=3):
    """Achieved FLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_interleaved({"mm": lambda: a @ b}, threads, rounds)["mm"]
    return 2 * n ** 3 / t


def cuda_graphed(fn, warmup=3):
    """fn captured once in a CUDA graph; the returned callable replays it. Replays cost no host
    work per op, so their time is the GPU's alone (launch and Python overheads removed)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay
