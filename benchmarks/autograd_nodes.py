"""The C++ autograd nodes against the Python autograd Functions they stand for:
`python -m benchmarks.autograd_nodes`.

Eager training steps record fastbn's C++ nodes (csrc/eager_calls.cpp: BatchNormFunction,
LinearLeakyReLUFunction); torch.compile and __torch_function__ take the Python Functions
(fastbn/ops.py), which record the same ops. This times one training step each way,
torch.autograd.grad(apply(...), leaves, dy), both in one process, interleaved round by round
(benchmarks.harness), after checking that both give the same gradients to the bit. What differs
is only the framework's part: recording the node and the engine's call of its backward.
"""
import argparse
import platform

import torch

from benchmarks.harness import medians, round_ratios, time_rounds
from benchmarks.run import commit, device_name
from fastbn import _C, ops

# (name, kind, shape, what it differentiates): the study's MLP layers and small BatchNorms,
# where the framework's part is a large share of the step
CASES = [
    ("BatchNorm1d 200x1000 train", "bn", (200, 1000), "train"),
    ("BatchNorm1d 200x1000 eval", "bn", (200, 1000), "eval"),
    ("BatchNorm1d 8x1000 train", "bn", (8, 1000), "train"),
    ("BatchNorm2d 1x512x4x4 train", "bn", (1, 512, 4, 4), "train"),
    ("Linear+LeakyReLU 200x100->10", "linear", (200, 100, 10), "all"),
    ("Linear+LeakyReLU 200x100->10, first layer", "linear", (200, 100, 10), "params"),
    ("Linear+LeakyReLU 200x3072->100", "linear", (200, 3072, 100), "all"),
]


def step_fns(kind, shape, mode, device):
    """{'node': step, 'function': step}, each returning its gradients."""
    gen = torch.Generator().manual_seed(0)
    if kind == "bn":
        C = shape[1]
        x = torch.randn(shape, generator=gen).to(device)
        w, b = torch.rand(C, generator=gen).add(0.5).to(device), torch.randn(C, generator=gen).to(device)
        rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
        leaves = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
        args = (x, w, b, rm, rv, mode == "train", 0.1, 1e-5)
        node, function = _C.eager.batch_norm_autograd, ops.BatchNormFunction.apply
    else:
        rows, n_in, n_out = shape
        x = torch.randn(rows, n_in, generator=gen).to(device)
        w = (torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(device)
        b = torch.randn(n_out, generator=gen).to(device)
        leaves = ([x.requires_grad_()] if mode == "all" else []) + [w.requires_grad_(), b.requires_grad_()]
        args = (x, w, b, 0.01)
        node, function = _C.eager.linear_leaky_relu_autograd, ops.LinearLeakyReLUFunction.apply
    out = node(*args)
    dy = torch.randn(out.shape, generator=gen).to(device)
    return {name: (lambda apply=apply: torch.autograd.grad(apply(*args), leaves, dy))
            for name, apply in (("node", node), ("function", function))}


def measure(device, threads, rounds, min_run_time, cases=CASES):
    rows = []
    for name, kind, shape, mode in cases:
        fns = step_fns(kind, shape, mode, device)
        for a, b in zip(fns["node"](), fns["function"]()):
            assert torch.equal(a, b), f"{name}: the node's gradients differ from the Function's"
        per = time_rounds(fns, threads, rounds, min_run_time)
        rows.append((name, medians(per), round_ratios(per, num="function", den="node")))
    return rows


def main(argv=None, cases=CASES):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--min-run-time", type=float, default=0.2)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = measure(device, threads, args.rounds, args.min_run_time, cases)
    lines = [f"Training steps, C++ autograd node against Python autograd Function, float32 on "
             f"{device_name(device)}: commit {commit()}, torch {torch.__version__}, python "
             f"{platform.python_version()}, {args.rounds} rounds of torch.utils.benchmark medians (min run time "
             f"{args.min_run_time} s), both interleaved", "",
             "| step | node us | Function us | Function / node | per round |", "|---|---|---|---|---|"]
    for name, t, (mid, lo, hi) in rows:
        lines.append(f"| {name} | {1e6 * t['node']:.1f} | {1e6 * t['function']:.1f} | "
                     f"**{t['function'] / t['node']:.2f}x** | {mid:.2f}x ({lo:.2f}-{hi:.2f}) |")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
