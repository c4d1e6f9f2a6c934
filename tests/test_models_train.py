"""Models, the backend switch, and the experiment runner end to end on synthetic data."""
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbn import data as D
from fastbn import train
from fastbn.models import MLP, ConvNet


def test_output_shapes():
    assert MLP(3072, [100, 50], 10, 0.02)(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert ConvNet(3, 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="backend"):
        MLP(10, [5], 2, 0.1, backend="jax")


@pytest.mark.parametrize("make", [
    lambda b: MLP(3072, [64, 32], 10, 0.02, batch_norm_layers=True, backend=b),
    lambda b: ConvNet(3, 10, backend=b),
])
def test_backends_agree_on_one_step(make):
    torch.manual_seed(0)
    ours = make("fastbn").double()
    ref = make("torch").double()
    ref.load_state_dict(ours.state_dict())  # same parameter and buffer names on both backends
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    la, lb = F.cross_entropy(ours(x), y), F.cross_entropy(ref(x), y)
    torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
    la.backward()
    lb.backward()
    for (n, pa), pb in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-8, atol=1e-10, msg=n)


def write_cifar(folder, n=40):
    folder.mkdir(parents=True)
    r = np.random.default_rng(0)
    for name in D.TRAIN_FILES + D.TEST_FILES:
        labels = r.integers(0, 10, n)
        imgs = np.clip(r.normal(100, 30, (n, 3072)) + labels[:, None] * 10, 0, 255).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": imgs, "labels": labels.tolist()}, f, protocol=2)
    return folder


@pytest.mark.parametrize("experiment", ["numpy-mlp", "mlp", "cnn"])
def test_runner_writes_log_and_curves(tmp_path, experiment):
    folder = write_cifar(tmp_path / "cifar-10-batches-py")
    out = tmp_path / "run"
    train.main([experiment, "--data_dir", str(folder), "--max_steps", "20", "--eval_freq", "10",
                "--batch_size", "16", "--eval_batch_size", "16", "--out", str(out), "--quiet"])
    log = json.loads((out / "log.json").read_text())
    assert log["finished"] and [h["step"] for h in log["history"]] == [10, 20]
    assert all(0 <= h["test_acc"] <= 1 and np.isfinite(h["train_loss"]) for h in log["history"])
    assert log["config"]["max_steps"] == 20 and "python" in log["versions"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_from_checkpoint(tmp_path):
    out = tmp_path / "run"
    common = ["mlp", "--synthetic", "400", "--eval_freq", "10", "--out", str(out), "--quiet", "--batch_size", "20"]
    train.main(common + ["--max_steps", "20"])
    first = json.loads((out / "log.json").read_text())["history"]
    train.main(common + ["--max_steps", "40", "--resume"])
    log = json.loads((out / "log.json").read_text())
    assert [h["step"] for h in log["history"]] == [10, 20, 30, 40]
    assert log["history"][:2] == first  # the resumed run kept the earlier evaluations
    # and it equals an uninterrupted run of 40 steps
    straight = tmp_path / "straight"
    train.main(["mlp", "--synthetic", "400", "--eval_freq", "10", "--out", str(straight), "--quiet",
                "--batch_size", "20", "--max_steps", "40"])
    ref = json.loads((straight / "log.json").read_text())["history"]
    for a, b in zip(log["history"], ref):
        assert a["test_acc"] == pytest.approx(b["test_acc"]) and a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_reproduce_writes_report(tmp_path):
    out = tmp_path / "rep"
    train.main(["reproduce", "--synthetic", "200", "--max_steps", "4", "--eval_freq", "2", "--eval_batch_size", "40",
                "--out", str(out), "--quiet", "--only", "numpy-mlp,mlp-tuned"])
    report = (out / "REPORT.md").read_text()
    assert "| numpy-mlp |" in report and "| mlp-tuned |" in report and "47.66%" in report and "54.10%" in report
    assert (out / "mlp-tuned" / "curves.png").exists()
