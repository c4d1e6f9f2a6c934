"""fastbn against PyTorch's builtins: `python -m benchmarks.run [--quick] [--device cuda]`.

Rows: BatchNorm1d/2d/3d (forward, forward+backward, eval; contiguous and channels_last; each dtype) at the
models' shapes, at small batches and over a size sweep; Linear+LeakyReLU at the MLP's shapes and a sweep; the MLP
and ConvNet training steps end to end (fastbn backend against torch backend). Baselines: torch
eager, and torch.compile of the same builtin code where marked. Writes a markdown table and PNG
plots to benchmarks/results/, named by device and date, with device, versions and commit inside.
"""
import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

import fastbn
from benchmarks.harness import (batch_norm_bytes, copy_bandwidth, cuda_graphed, linear_flops, matmul_rate, medians,
                                round_ratios, time_interleaved, time_rounds)

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{fastbn.cpu_model()}, {torch.get_num_threads()} threads"


def commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else "unknown"
    except OSError:
        return "unknown"


# ---- cases ---------------------------------------------------------------------------------------


def shape_name(shape):
    return "x".join(map(str, shape))


def bn_case(shape, dtype, device, channels_last, mode):
    """(fns, bytes): fastbn and torch BatchNorm on one input; mode is fwd | fwd+bwd | eval."""
    C = shape[1]
    kind = {4: "BatchNorm2d", 5: "BatchNorm3d"}.get(len(shape), "BatchNorm1d")
    ours, ref = getattr(fastbn.nn, kind)(C, device=device), getattr(torch.nn, kind)(C, device=device)
    pdtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    ours.to(pdtype), ref.to(pdtype)
    if mode == "eval":
        ours.eval(), ref.eval()
    x = torch.randn(shape, device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    backward = mode == "fwd+bwd"
    if backward:
        x.requires_grad_()
    g = torch.randn_like(x)

    def make(m):
        if backward:
            return lambda: torch.autograd.grad(m(x), [x, m.weight, m.bias], g)

        def fwd():
            with torch.no_grad():
                return m(x)
        return fwd

    fns = {"fastbn": make(ours), "torch": make(ref)}
    nbytes = batch_norm_bytes(x.numel(), x.element_size(), training=mode != "eval", backward=backward)
    return fns, nbytes, ref, make


def linear_case(rows, n_in, n_out, dtype, device, backward, slope=0.02):
    x = torch.randn(rows, n_in, device=device, dtype=dtype, requires_grad=backward)
    ours = fastbn.nn.LinearLeakyReLU(n_in, n_out, negative_slope=slope, device=device, dtype=dtype)
    ref = torch.nn.Sequential(torch.nn.Linear(n_in, n_out, device=device, dtype=dtype), torch.nn.LeakyReLU(slope))
    g = torch.randn(rows, n_out, device=device, dtype=dtype)

    def make(m, params):
        if backward:
            return lambda: torch.autograd.grad(m(x), [x] + params, g)

        def fwd():
            with torch.no_grad():
                return m(x)
        return fwd

    fns = {"fastbn": make(ours, [ours.weight, ours.bias]), "torch": make(ref, [ref[0].weight, ref[0].bias])}
    return fns, linear_flops(rows, n_in, n_out, backward), ref, lambda m: make(m, [ref[0].weight, ref[0].bias])


def train_step_case(model_name, device, amp):
    from fastbn.models import MLP, ConvNet

    fns = {}
    for backend in ("fastbn", "torch"):
        torch.manual_seed(0)
        if model_name == "convnet":
            model = ConvNet(3, 10, backend=backend).to(device, memory_format=torch.channels_last)
            x = torch.randn(32, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (32,), device=device)
        else:
            hidden = [100] if model_name == "mlp" else [1000, 500, 200, 100, 100]
            model = MLP(3072, hidden, 10, 0.02, backend=backend).to(device)
            x, y = torch.randn(200, 3072, device=device), torch.randint(0, 10, (200,), device=device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt, x=x, y=y):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        fns[backend] = step
    return fns


# ---- the run -------------------------------------------------------------------------------------


def dtypes(device, quick, only=None):
    if quick:
        return [torch.float32]
    out = [torch.float32, torch.float64, torch.bfloat16] + ([torch.float16] if device.type == "cuda" else [])
    return [d for d in out if only is None or str(d).replace("torch.", "") in only]


def run(args, res):
    """Fills res (rows, sweep, bandwidths) case by case, so that an interrupted run keeps its rows."""
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    quick = args.quick
    rounds, mrt = (2, 0.02) if quick else (args.rounds, args.min_run_time)
    copy_bw = copy_bandwidth(device, threads, nbytes=(8 << 20) if quick else (256 << 20))
    mm_rate = matmul_rate(device, threads, n=256 if quick else 2048)
    rows, sweep = [], []
    res.update(rows=rows, sweep=sweep, copy_bw=copy_bw, mm_rate=mm_rate, device=device, threads=threads)
    only = set(args.dtypes.split(",")) if args.dtypes else None
    cases = args.cases.split(",") if args.cases else None

    def wanted(case):
        return cases is None or any(c in case for c in cases)
    # On CUDA every float32 case is also timed as a CUDA graph replay: the GPU's time alone.
    graphs = device.type == "cuda" and not quick

    def graph_times(fns):
        try:
            return time_rounds({name: cuda_graphed(fn) for name, fn in fns.items()}, threads, rounds, mrt)
        except Exception as e:  # a side that cannot be captured: report it, keep the eager row
            print(f"  (CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]})", flush=True)
            return None

    def add(group, case, mode, dtype, layout, per_round, work, unit, compiled=None):
        t = medians(per_round)
        ratio = t["torch"] / t["fastbn"]
        mid, lo, hi = round_ratios(per_round)
        if unit == "GB/s":
            achieved = work / t["fastbn"] / 1e9
            roof = f"{100 * work / t['fastbn'] / copy_bw:.0f}% of copy"
        else:
            achieved = work / t["fastbn"] / 1e9
            roof = f"{100 * work / t['fastbn'] / mm_rate:.0f}% of matmul"
        rows.append(dict(group=group, case=case, mode=mode, dtype=str(dtype).replace("torch.", ""), layout=layout,
                         fastbn_ms=1e3 * t["fastbn"], torch_ms=1e3 * t["torch"], ratio=ratio,
                         ratio_mid=mid, ratio_lo=lo, ratio_hi=hi,
                         compiled_ms=None if compiled is None else 1e3 * compiled,
                         achieved=f"{achieved:.1f} {unit}" if work else "-", roof=roof if work else "-"))
        print(f"{group:12s} {case:22s} {mode:8s} {rows[-1]['dtype']:9s} {layout:14s} fastbn {1e3 * t['fastbn']:9.3f} ms"
              f"  torch {1e3 * t['torch']:9.3f} ms  x{ratio:5.2f} (rounds {mid:.2f}, {lo:.2f}-{hi:.2f})"
              f"  {rows[-1]['achieved']}", flush=True)

    def compiled_time(ref, make):
        compiled = torch.compile(ref)
        fn = make(compiled)
        for _ in range(2):
            fn()
        return time_interleaved({"c": fn}, threads, rounds, mrt)["c"]

    # BatchNorm at the models' shapes, then small batches (inference, per-sample steps), where
    # per-channel work rather than memory decides
    bn_shapes = [(8, 16, 8, 8), (16, 32)] if quick else [(128, 64, 32, 32), (32, 256, 8, 8), (32, 64, 32, 32),
                                                           (32, 512, 2, 2), (200, 1000), (1, 512, 4, 4), (8, 1000),
                                                           (8, 32, 16, 16, 16)]
    for shape in (s for s in bn_shapes if wanted(shape_name(s))):
        for dtype in dtypes(device, quick, only):
            for cl in ((False, True) if len(shape) >= 4 else (False,)):
                for mode in ("fwd", "fwd+bwd", "eval"):
                    if dtype != torch.float32 and mode != "fwd+bwd":
                        continue  # other dtypes: the training step only
                    fns, nbytes, ref, make = bn_case(shape, dtype, device, cl, mode)
                    t = time_rounds(fns, threads, rounds, mrt)
                    comp = None
                    if args.compile and dtype == torch.float32 and mode == "fwd+bwd" and shape in bn_shapes[:2]:
                        comp = compiled_time(ref, make)
                    layout = "channels_last" if cl else "contiguous"
                    add("BatchNorm", shape_name(shape), mode, dtype, layout, t, nbytes, "GB/s", comp)
                    if graphs and dtype == torch.float32 and (tg := graph_times(fns)):
                        add("BN (graph)", shape_name(shape), mode, dtype, layout, tg, nbytes, "GB/s")

    # BatchNorm2d size sweep: training forward+backward, float32
    sizes = [1 << 12, 1 << 16] if quick else [1 << k for k in range(12, 27, 2)]  # values: 16 KB .. 256 MB
    for numel in sizes:
        hw = max(1, numel // (32 * 64))
        side = int(hw ** 0.5)
        shape = (max(1, numel // (64 * side * side)), 64, side, side)
        if not wanted(shape_name(shape)):
            continue
        fns, nbytes, _, _ = bn_case(shape, torch.float32, device, False, "fwd+bwd")
        t = time_rounds(fns, threads, rounds, mrt)
        sweep.append((nbytes / 5, medians(t), nbytes))  # input bytes
        add("BN sweep", shape_name(shape), "fwd+bwd", torch.float32, "contiguous", t, nbytes, "GB/s")
        if graphs and (tg := graph_times(fns)):
            add("sweep (graph)", shape_name(shape), "fwd+bwd", torch.float32, "contiguous", tg, nbytes, "GB/s")

    # Linear + LeakyReLU
    lin_shapes = [(16, 64, 32)] if quick else [(200, 3072, 100), (200, 100, 10), (200, 3072, 1000),
                                               (200, 1000, 500), (1024, 1024, 1024), (4096, 4096, 1024)]
    for n_rows, n_in, n_out in (s for s in lin_shapes if wanted(f"{s[0]}x{s[1]}->{s[2]}")):
        for dtype in dtypes(device, quick, only):
            if dtype == torch.float16 and device.type == "cpu":
                continue
            for backward in (False, True):
                if dtype != torch.float32 and not backward:
                    continue
                fns, flops, ref, make = linear_case(n_rows, n_in, n_out, dtype, device, backward)
                t = time_rounds(fns, threads, rounds, mrt)
                comp = None
                if args.compile and dtype == torch.float32 and backward and (n_rows, n_in, n_out) in lin_shapes[:3]:
                    comp = compiled_time(ref, make)
                mode = "fwd+bwd" if backward else "fwd"
                add("Linear+LReLU", f"{n_rows}x{n_in}->{n_out}", mode, dtype, "-", t, flops, "GFLOP/s", comp)
                if graphs and dtype == torch.float32 and (tg := graph_times(fns)):
                    add("Lin (graph)", f"{n_rows}x{n_in}->{n_out}", mode, dtype, "-", tg, flops, "GFLOP/s")

    # training steps, end to end
    if not quick:
        for model_name, amp in (("mlp", False), ("mlp-tuned", False), ("convnet", False), ("convnet", True)):
            if not wanted(model_name + (" bf16" if amp else "")):
                continue
            t = time_rounds(train_step_case(model_name, device, amp), threads, 3, 1.0)
            add("train step", model_name + (" bf16" if amp else ""), "step", torch.float32, "-", t, 0, "-")


SLOWER_EVERY_ROUND = 0.98  # below parity by more than timing's own jitter


def slower_every_round(rows):
    """The rows where torch won every paired round by more than 2%: a loss the drift between rounds
    cannot explain."""
    return [r for r in rows if r["ratio_hi"] < SLOWER_EVERY_ROUND]


def write_results(res, args):
    device = res["device"]
    today = datetime.date.today().isoformat()
    tag = "cuda-" + torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    stem = f"{tag}-{today}{'-quick' if args.quick else ''}{'-cases' if args.cases else ''}"
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    info = fastbn.build_info()
    head = [
        f"# fastbn benchmarks: {device_name(device)}",
        "",
        f"- date: {today}; commit: {commit()}; command: `python -m benchmarks.run {' '.join(sys.argv[1:])}`",
        f"- torch {torch.__version__}; fastbn {info['version']} (CPU loops: {info['cpu_isa']}, CUDA kernels: "
        f"{info['cuda_kernels']}); python {platform.python_version()}; threads {res['threads']}",
        f"- measured copy bandwidth {res['copy_bw'] / 1e9:.1f} GB/s (read + write), float32 matmul "
        f"{res['mm_rate'] / 1e9:.0f} GFLOP/s",
        "- times: torch.utils.benchmark medians, fastbn and torch interleaved, median of rounds; "
        "ratio = torch / fastbn (> 1: fastbn faster) of those medians; `ratio per round`: the median, lowest and "
        "highest of the rounds' own ratios (each round times both sides back to back, so its ratio is paired "
        "against the machine's drift; the spread shows how much it moved); "
        "`compiled` = torch.compile of the builtin module",
    ]
    if any("(graph)" in r["group"] for r in res["rows"]):
        head.append("- `(graph)` rows (CUDA): the same calls captured in a CUDA graph and replayed, so the GPU's "
                    "time alone (no Python, dispatcher or launch cost); the other rows are eager calls, host work "
                    "included")
    if res.get("interrupted"):
        head.append("- **interrupted**: the run stopped early (time limit); the rows below are those measured")
    head += [
        "",
        "| group | case | mode | dtype | layout | fastbn ms | torch ms | ratio | ratio per round | torch.compile ms | "
        "fastbn achieved | of roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        comp = f"{r['compiled_ms']:.3f}" if r["compiled_ms"] is not None else "-"
        head.append(f"| {r['group']} | {r['case']} | {r['mode']} | {r['dtype']} | {r['layout']} | {r['fastbn_ms']:.3f} | "
                    f"{r['torch_ms']:.3f} | **{r['ratio']:.2f}x** | "
                    f"{r['ratio_mid']:.2f}x ({r['ratio_lo']:.2f}-{r['ratio_hi']:.2f}) | {comp} | "
                    f"{r['achieved']} | {r['roof']} |")
    slower = [f"{r['group']} {r['case']} {r['mode']} {r['dtype']} {r['layout']}: {r['ratio_mid']:.2f}x "
              f"({r['ratio_lo']:.2f}-{r['ratio_hi']:.2f})" for r in slower_every_round(res["rows"])]
    if slower:
        head += ["", f"Slower than torch in every round (even the best round's ratio below {SLOWER_EVERY_ROUND}: not "
                 "the machine's drift; rerun alone before reading it as a regression):", ""]
        head += [f"- {line}" for line in slower]
    base, n = stem, 1
    while (out / f"{stem}.md").exists():  # a second run that day: keep the first one's files
        n += 1
        stem = f"{base}-run{n}"
    md = out / f"{stem}.md"
    if res["sweep"]:
        head += ["", f"![size sweep]({stem}-sweep.png)"]
        plot_sweep(res, out / f"{stem}-sweep.png", device_name(device))
    md.write_text("\n".join(head + [""]))
    for line in slower:
        print(f"slower than torch in every round: {line}")
    print(f"wrote {md}")
    return md


def plot_sweep(res, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s[0] for s in res["sweep"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.semilogx(sizes, [s[2] / s[1]["fastbn"] / 1e9 for s in res["sweep"]], "o-", label="fastbn")
    ax1.semilogx(sizes, [s[2] / s[1]["torch"] / 1e9 for s in res["sweep"]], "s-", label="torch")
    ax1.axhline(res["copy_bw"] / 1e9, color="gray", linestyle="--", label="copy bandwidth")
    ax1.set_xlabel("input bytes")
    ax1.set_ylabel("GB/s (5 passes: x, y, dy, x, dx)")
    ax1.set_title("BatchNorm2d train fwd+bwd, float32")
    ax1.legend()
    ax2.semilogx(sizes, [s[1]["torch"] / s[1]["fastbn"] for s in res["sweep"]], "o-")
    ax2.axhline(1, color="gray", linestyle="--")
    ax2.set_xlabel("input bytes")
    ax2.set_ylabel("speed-up over torch eager")
    ax2.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, few rounds (under 2 minutes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--compile", type=int, default=1, help="also time torch.compile baselines (1/0)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (median taken)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per torch.utils.benchmark measurement")
    p.add_argument("--dtypes", default=None, help="only these dtypes, comma-separated (e.g. float32,bfloat16)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--cases", default=None,
                   help="only the cases whose name contains one of these, comma-separated (e.g. 200x1000,mlp); "
                        "the results file is then named ...-cases.md")
    args = p.parse_args(argv)
    if args.quick:
        args.compile = 0
    # a time limit's SIGTERM ends the run like Ctrl-C: the rows measured so far are still written
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    res = {}
    try:
        run(args, res)
    except KeyboardInterrupt:
        if not res.get("rows"):
            raise
        res["interrupted"] = True
        print("interrupted: writing the rows measured so far", flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return write_results(res, args)


if __name__ == "__main__":
    main()
