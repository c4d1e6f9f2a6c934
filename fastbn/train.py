"""The experiment runner: `fastbn-train EXPERIMENT [flags]` (or `python -m fastbn.train`).

Experiments: numpy-mlp, mlp, cnn (the study's three models) and `reproduce`, which runs the
study's four settings and writes REPORT.md. Flag names and defaults are the original
assignment's; each run writes into --out a JSON log (config, per-evaluation train loss/accuracy
and test accuracy, wall time, device, versions), the curves as PNG, and a checkpoint that
`--resume` continues from. Files are replaced atomically, so a killed run never leaves half a file.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EXPERIMENTS = ("numpy-mlp", "mlp", "cnn")
DEFAULTS = {
    "numpy-mlp": dict(dnn_hidden_units="100", learning_rate=2e-3, max_steps=1500, batch_size=200, eval_freq=100,
                      neg_slope=0.02, optimizer="sgd", weight_decay=0.0),
    "mlp": dict(dnn_hidden_units="100", learning_rate=2e-3, max_steps=1500, batch_size=200, eval_freq=100,
                neg_slope=0.02, optimizer="sgd", weight_decay=0.0),
    "cnn": dict(dnn_hidden_units="", learning_rate=1e-4, max_steps=5000, batch_size=32, eval_freq=500,
                neg_slope=0.0, optimizer="adam", weight_decay=0.0),
}
# The study's four runs: (name, experiment, overrides), its best test accuracy, the assignment's target.
STUDY = [
    ("numpy-mlp", "numpy-mlp", {}, 47.66, 46.0),
    ("mlp", "mlp", {}, 42.9, 52.0),
    ("mlp-tuned", "mlp", dict(dnn_hidden_units="1000,500,200,100,100", neg_slope=0.002, optimizer="adam-amsgrad",
                              learning_rate=1e-4, weight_decay=1e-5, max_steps=6000), 54.1, None),
    ("cnn", "cnn", {}, 78.81, 75.0),
]


# ---- files --------------------------------------------------------------------------------------


def atomic_write(path, write):
    """write(f) into a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def plot_curves(history, path, title, target=None):
    """The study's figure: accuracy (train, test) on top, train loss below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax1.plot(steps, [100 * h["train_acc"] for h in history], label="train")
    ax1.plot(steps, [100 * h["test_acc"] for h in history], label="test")
    if target is not None:
        ax1.axhline(target, color="green", linestyle="--", label=f"target {target:g}%")
    ax1.set_ylabel("accuracy (%)")
    ax1.legend()
    ax1.set_title(title)
    ax2.plot(steps, [h["train_loss"] for h in history], color="tab:red")
    ax2.set_ylabel("train loss")
    ax2.set_xlabel("step")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def git_commit():
    """The checkout's commit, when fastbn runs from one (recorded in logs and the report)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions():
    import fastbn  # without torch too (the NumPy MLP): then no build_info

    out = {"commit": git_commit(), "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
           "processor": fastbn.cpu_model(), "cpus": os.cpu_count()}
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        import torch

        out["torch"] = torch.__version__
        out["fastbn"] = fastbn.build_info()
    return out


# ---- data ---------------------------------------------------------------------------------------


def synthetic_cifar(n_train, n_test, seed):
    """Random data of CIFAR-10's shape and format (for tests and GPU timing without the data set)."""
    from fastbn.data import CIFAR10, DataSet

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n_train + n_test)
    # class-dependent mean colour, so that a model can learn something
    images = np.clip(rng.normal(128, 40, (n_train + n_test, 3, 32, 32)) + (labels * 10)[:, None, None, None], 0, 255)
    images = images.astype(np.uint8)
    mean = images[:n_train].mean(0, dtype=np.float64).astype(np.float32)
    return CIFAR10(DataSet(images[:n_train], labels[:n_train], mean, seed),
                   DataSet(images[n_train:], labels[n_train:], mean, seed + 1), Path("synthetic"))


def load_data(args):
    if args.synthetic:
        return synthetic_cifar(args.synthetic, max(args.synthetic // 5, args.batch_size), args.seed)
    from fastbn.data import load_cifar10

    return load_cifar10(args.data_dir, seed=args.seed)


# ---- the torch experiments ----------------------------------------------------------------------


def make_optimizer(name, params, lr, weight_decay, device):
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name in ("adam", "adam-amsgrad"):
        # fused: one kernel over all parameters instead of a dozen ops per tensor
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=name == "adam-amsgrad",
                                fused=device.type in ("cpu", "cuda"))
    raise ValueError(f"--optimizer must be sgd, adam or adam-amsgrad, got {name!r}")


def run_torch(args, data, out, progress):
    import torch
    import torch.nn.functional as F

    from fastbn.models import MLP, ConvNet

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.experiment == "mlp":
        hidden = [int(h) for h in args.dnn_hidden_units.split(",") if h]
        model = MLP(3 * 32 * 32, hidden, 10, args.neg_slope, backend=args.backend)
        flatten, fmt = True, torch.contiguous_format
    else:
        model = ConvNet(3, 10, backend=args.backend)
        flatten = False
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=fmt)
    opt = make_optimizer(args.optimizer, model.parameters(), args.learning_rate, args.weight_decay, device)
    amp = args.amp == "bf16"

    def to_tensor(x, y):
        x = torch.from_numpy(x).to(device, non_blocking=True)
        if not flatten:
            x = x.contiguous(memory_format=fmt)
        return x, torch.from_numpy(y).to(device, non_blocking=True)

    def evaluate():
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for i in range(0, len(data.test), args.eval_batch_size):
                idx = np.arange(i, min(i + args.eval_batch_size, len(data.test)))
                x, y = to_tensor(*data.test.batch(idx, flatten=flatten))
                correct += int((model(x).argmax(1) == y).sum())
        model.train()
        return correct / len(data.test)

    state = {"step": 0, "history": [], "elapsed": 0.0}
    ckpt = out / "checkpoint.pt"
    if args.resume and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        data.train.load_state(saved["data"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]

    losses, accs = [], []
    start = time.perf_counter() - state["elapsed"]
    for step in range(state["step"] + 1, args.max_steps + 1):
        x, y = to_tensor(*data.train.next_batch(args.batch_size, flatten=flatten))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        accs.append((logits.detach().argmax(1) == y).float().mean())
        progress(step, None)
        if step % args.eval_freq == 0 or step == args.max_steps:
            rec = {"step": step, "train_loss": float(torch.stack(losses).mean()),
                   "train_acc": float(torch.stack(accs).mean()), "test_acc": evaluate(),
                   "time_s": time.perf_counter() - start}
            losses, accs = [], []
            state = {"step": step, "history": state["history"] + [rec], "elapsed": rec["time_s"]}
            progress(step, rec)
            saved = {"model": model.state_dict(), "optimizer": opt.state_dict(), "data": data.train.state(),
                     "torch_rng": torch.get_rng_state(), "state": state}
            atomic_write(ckpt, lambda f: torch.save(saved, f))
            write_log(args, out, state["history"], final=False)
    return state["history"]


def run_numpy(args, data, out, progress):
    from fastbn.numpy_mlp.train import train

    hidden = [int(h) for h in args.dnn_hidden_units.split(",") if h]

    def on_eval(rec):
        progress(rec["step"], rec)

    _, history = train(data, hidden, args.neg_slope, args.learning_rate, args.max_steps, args.batch_size,
                       args.eval_freq, args.seed, on_eval=on_eval, progress=lambda s, _l: progress(s, None))
    return history


# ---- one experiment -----------------------------------------------------------------------------


def write_log(args, out, history, final):
    best = max(history, key=lambda h: h["test_acc"]) if history else None
    write_json(out / "log.json", {
        "experiment": args.experiment, "config": {k: v for k, v in vars(args).items() if k != "func"},
        "history": history, "best_test_acc": best["test_acc"] if best else None,
        "best_step": best["step"] if best else None, "wall_time_s": history[-1]["time_s"] if history else 0.0,
        "finished": final, "device": args.device, "data": "synthetic" if args.synthetic else "CIFAR-10 (JPEG-decoded copy)",
        "versions": versions(),
    })


def run_experiment(args):
    from tqdm import tqdm

    out = Path(args.out or f"runs/{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    if args.experiment == "numpy-mlp" and args.resume:
        raise SystemExit("--resume is supported for the torch experiments (mlp, cnn); the NumPy MLP takes seconds")
    data = load_data(args)
    bar = tqdm(total=args.max_steps, desc=args.experiment, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=args.quiet)
    last = {}

    def progress(step, rec):
        if rec is not None:
            last.update(test=f"{100 * rec['test_acc']:.1f}%", loss=f"{rec['train_loss']:.3f}")
            bar.set_postfix(last, refresh=False)
        bar.n = step
        bar.refresh() if rec is not None else bar.update(0)

    run = run_numpy if args.experiment == "numpy-mlp" else run_torch
    history = run(args, data, out, progress)
    bar.close()
    write_log(args, out, history, final=True)
    plot_curves(history, out / "curves.png", f"{args.experiment} ({args.backend if args.experiment != 'numpy-mlp' else 'numpy'})",
                target=None)
    best = max(h["test_acc"] for h in history)
    print(f"{args.experiment}: best test accuracy {100 * best:.2f}% in {history[-1]['time_s']:.1f} s -> {out}")
    return history


# ---- reproduce ----------------------------------------------------------------------------------


def reproduce(args):
    out = Path(args.out or "runs/reproduce")
    rows = []
    for name, experiment, overrides, study, target in STUDY:
        if args.only and name not in args.only.split(","):
            continue
        run_args = build_args([experiment], parent=args)
        for k, v in overrides.items():
            if getattr(args, k, None) is None:  # a flag given to reproduce wins over the study's setting
                setattr(run_args, k, v)
        run_args.out = str(out / name)
        t = time.perf_counter()
        history = run_experiment(run_args)
        wall = time.perf_counter() - t
        best = max(history, key=lambda h: h["test_acc"])
        plot_curves(history, out / name / "curves.png", name, target)
        rows.append((name, run_args, best, wall, study, target))
    write_report(out, rows, args)


def write_report(out, rows, args):
    total = sum(r[3] for r in rows)
    v = versions()
    lines = [
        "# fastbn: the CIFAR-10 study, reproduced",
        "",
        f"Command: `fastbn-train reproduce{' --device ' + args.device if args.device != 'cpu' else ''}` "
        f"({time.strftime('%Y-%m-%d')}, commit {v['commit']}). Device: {args.device} ({v['processor']}, {v['cpus']} CPUs); "
        f"torch {v.get('torch', '-')}, numpy {v['numpy']}, python {v['python']}.",
        "",
        "Data: " + ("synthetic (not CIFAR-10)" if args.synthetic else
                    "the JPEG-decoded copy of CIFAR-10 in `shared/data` (pixels carry JPEG error; "
                    "accuracies are not directly comparable to the original pixels)."),
        "",
        "| experiment | settings | best test acc. | at step | study | assignment target | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, a, best, wall, study, target in rows:
        settings = (f"hidden {a.dnn_hidden_units or '-'}, {a.optimizer}, lr {a.learning_rate:g}, "
                    f"{a.max_steps} steps, batch {a.batch_size}"
                    + (f", wd {a.weight_decay:g}" if a.weight_decay else "")
                    + (f", slope {a.neg_slope:g}" if a.experiment != "cnn" else "")
                    + (f", backend {a.backend}, {a.amp} autocast" if a.experiment != "numpy-mlp" else ""))
        lines.append(f"| {name} | {settings} | **{100 * best['test_acc']:.2f}%** | {best['step']} | {study:.2f}% | "
                     f"{f'{target:g}%' if target else '-'} | {wall:.0f} s |")
    lines += ["", f"Total wall time: {total / 60:.1f} min.", ""]
    for name, *_ in rows:
        lines += [f"## {name}", "", f"![{name}]({name}/curves.png)", ""]
    atomic_write(out / "REPORT.md", lambda f: f.write("\n".join(lines).encode()))
    print(f"report: {out / 'REPORT.md'} ({total / 60:.1f} min)")


# ---- command line -------------------------------------------------------------------------------


def parser():
    p = argparse.ArgumentParser(prog="fastbn-train", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=EXPERIMENTS + ("reproduce",))
    p.add_argument("--dnn_hidden_units", type=str, default=None, help="comma-separated hidden sizes (MLPs)")
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--eval_freq", type=int, default=None)
    p.add_argument("--neg_slope", type=float, default=None)
    p.add_argument("--optimizer", choices=("sgd", "adam", "adam-amsgrad"), default=None)
    p.add_argument("--weight_decay", type=float, default=None)
    p.add_argument("--data_dir", type=str, default=None, help="folder with the cifar-10-batches-py files")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", type=str, default="cpu")
    p.add_argument("--backend", choices=("fastbn", "torch"), default="fastbn")
    p.add_argument("--amp", choices=("none", "bf16"), default=None,
                   help="autocast dtype (default: bf16 for the cnn, none for the MLPs)")
    p.add_argument("--channels_last", type=int, default=1, help="cnn: channels_last memory format (1/0)")
    p.add_argument("--eval_batch_size", type=int, default=500)
    p.add_argument("--out", type=str, default=None, help="output folder (default runs/<experiment>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--synthetic", type=int, default=0, help="use N synthetic training images instead of CIFAR-10")
    p.add_argument("--only", type=str, default=None, help="reproduce: a comma-separated subset of the runs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def build_args(argv, parent=None):
    args = parser().parse_args(argv)
    if parent is not None:  # reproduce: inherit the shared flags
        for k in ("data_dir", "seed", "device", "backend", "eval_batch_size", "synthetic", "quiet", "channels_last",
                  "amp", "max_steps"):
            setattr(args, k, getattr(parent, k))
    if args.experiment in DEFAULTS:
        for k, v in DEFAULTS[args.experiment].items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        if args.amp is None:
            args.amp = "bf16" if args.experiment == "cnn" else "none"
    return args


def main(argv=None):
    args = build_args(sys.argv[1:] if argv is None else argv)
    if args.experiment == "reproduce":
        reproduce(args)
    else:
        run_experiment(args)


if __name__ == "__main__":
    main()
