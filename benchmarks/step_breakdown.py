"""Where a BatchNorm training step's time goes, fastbn beside torch: `python -m benchmarks.step_breakdown`.

One shape (default 200x1000, the BatchNorm1d of the study's MLP; `--channels-last` for a 4D/5D
input in that layout), one process, every part of both sides timed interleaved round by round
(benchmarks.harness):

  step       torch.autograd.grad(module(x), [x, weight, bias], dy): the benchmark's fwd+bwd row
  forward    module(x), recording the graph
  backward   torch.autograd.grad on a graph kept with retain_graph: the backward leg alone
  ops        the forward and backward ops called directly under no_grad, nothing else
             (fastbn::batch_norm + fastbn::batch_norm_backward; aten::native_batch_norm +
             aten::native_batch_norm_backward)

and derives the framework's share, step - ops: the Python module, the autograd Function or node,
torch.autograd.grad and its engine, which both sides pay. Prints a markdown table.
"""
import argparse
import platform

import torch

import fastbn
from benchmarks.harness import medians, round_ratios, time_rounds
from benchmarks.run import commit, device_name

PARTS = ("step", "forward", "backward", "ops")


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected a shape such as 200x1000 or 32x256x8x8 (N x C x ...), got {text!r}")
    return shape


def side_fns(side, shape, device, channels_last=False, seed=0):
    """{part: callable} for one side ('fastbn' or 'torch'), and its gradients from a step and from the ops."""
    kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[len(shape)]
    gen = torch.Generator().manual_seed(seed)
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)] if channels_last else torch.contiguous_format
    x = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt).requires_grad_()
    dy = torch.randn(shape, generator=gen).to(device).contiguous(memory_format=fmt)
    m = getattr(fastbn.nn if side == "fastbn" else torch.nn, kind)(shape[1], device=device)
    params = [x, m.weight, m.bias]
    xd, w, b, rm, rv = x.detach(), m.weight.detach(), m.bias.detach(), m.running_mean, m.running_var
    if side == "fastbn":
        ops = torch.ops.fastbn

        def ops_step():
            with torch.no_grad():
                _, mean, invstd = ops.batch_norm.default(xd, w, b, rm, rv, True, m.momentum, m.eps)
                return ops.batch_norm_backward.default(dy, xd, mean, invstd, w)
    else:
        aten = torch.ops.aten

        def ops_step():
            with torch.no_grad():
                _, mean, invstd = aten.native_batch_norm.default(xd, w, b, rm, rv, True, m.momentum, m.eps)
                return aten.native_batch_norm_backward.default(dy, xd, w, rm, rv, mean, invstd, True, m.eps,
                                                               [True, True, True])

    kept = m(x)  # a graph for the backward leg alone

    fns = {
        "step": lambda: torch.autograd.grad(m(x), params, dy),
        "forward": lambda: m(x),
        "backward": lambda: torch.autograd.grad(kept, params, dy, retain_graph=True),
        "ops": ops_step,
    }
    return fns, (fns["step"](), ops_step())


def measure(shape, device, threads, rounds, min_run_time, channels_last=False):
    """{part: {side: [seconds per round]}}, after checking that each side's ops give its step's gradients."""
    fns = {}
    for side in ("fastbn", "torch"):
        side_parts, (from_step, from_ops) = side_fns(side, shape, device, channels_last)
        for name, a, b in zip(("input", "weight", "bias"), from_step, from_ops):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{side} {name} gradient: {m}")
        fns.update({(part, side): fn for part, fn in side_parts.items()})
    per = time_rounds(fns, threads, rounds, min_run_time)  # every part of both sides, in each round
    return {part: {side: per[(part, side)] for side in ("fastbn", "torch")} for part in PARTS}


def table(per):
    """Markdown rows: each part's medians (us), torch / fastbn, and the framework's share (step - ops)."""
    t = {part: medians(sides) for part, sides in per.items()}
    lines = ["| part | fastbn us | torch us | torch / fastbn | per round |", "|---|---|---|---|---|"]
    for part in PARTS:
        mid, lo, hi = round_ratios(per[part])
        f, r = 1e6 * t[part]["fastbn"], 1e6 * t[part]["torch"]
        lines.append(f"| {part} | {f:.1f} | {r:.1f} | **{r / f:.2f}x** | {mid:.2f}x ({lo:.2f}-{hi:.2f}) |")
    frame = {s: [a - b for a, b in zip(per["step"][s], per["ops"][s])] for s in ("fastbn", "torch")}
    f, r = (1e6 * medians(frame)[s] for s in ("fastbn", "torch"))
    lines.append(f"| framework (step - ops, per round) | {f:.1f} | {r:.1f} | {r / f:.2f}x | |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=parse_shape, default=(200, 1000), help="N x C [x spatial], e.g. 200x1000")
    p.add_argument("--channels-last", action="store_true", help="input and dy in channels_last (4D, 5D)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--min-run-time", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.channels_last and len(args.shape) not in (4, 5):
        p.error(f"--channels-last needs a 4D or 5D shape, got {len(args.shape)}D")
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    per = measure(args.shape, device, threads, args.rounds, args.min_run_time, args.channels_last)
    shape = "x".join(map(str, args.shape)) + (" channels_last" if args.channels_last else "")
    lines = [
        f"BatchNorm training step {shape} float32 on {device_name(device)}: commit {commit()}, torch "
        f"{torch.__version__}, python {platform.python_version()}, {args.rounds} rounds "
        f"of torch.utils.benchmark medians (min run time {args.min_run_time} s), all parts interleaved",
        "",
        *table(per),
    ]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
