"""The benchmark harness: its arithmetic, and a --quick run on tiny sizes (no timing assertions)."""
import argparse

import pytest
import torch

from benchmarks.harness import batch_norm_bytes, linear_flops, round_ratios
from benchmarks import run


def test_batch_norm_bytes():
    assert batch_norm_bytes(1000, 4, training=True, backward=False) == 2 * 4000
    assert batch_norm_bytes(1000, 4, training=False, backward=False) == 2 * 4000
    assert batch_norm_bytes(1000, 2, training=True, backward=True) == 5 * 2000
    assert batch_norm_bytes(10, 8, training=False, backward=True) == 5 * 80


def test_linear_flops():
    assert linear_flops(200, 3072, 100, backward=False) == 2 * 200 * 3072 * 100
    assert linear_flops(200, 3072, 100, backward=True) == 3 * 2 * 200 * 3072 * 100
    assert linear_flops(200, 3072, 100, backward=True, input_grad=False) == 2 * 2 * 200 * 3072 * 100


def test_round_ratios_pair_the_rounds():
    assert round_ratios({"torch": [2.0, 3.0, 4.0], "fastbn": [1.0, 1.0, 4.0]}) == (2.0, 1.0, 3.0)


def test_quick_run_writes_table_and_plot(tmp_path):
    md = run.main(["--quick", "--out", str(tmp_path)])
    text = md.read_text()
    assert "| BatchNorm |" in text and "| Linear+LReLU |" in text and "commit:" in text and "torch " in text
    row = next(line for line in text.splitlines() if line.startswith("| BatchNorm |"))
    mid, spread = row.split(" | ")[8].split("x (")  # the `ratio per round` column: "M.MMx (L.LL-H.HH)"
    lo, hi = spread.rstrip(")").split("-")
    assert 0 < float(lo) <= float(mid) <= float(hi)
    assert len(list(tmp_path.glob("*-sweep.png"))) == 1


def test_interrupted_run_still_writes_its_rows(tmp_path, monkeypatch):
    real_run = run.run

    def run_then_stop(args, res):  # as a time limit's SIGTERM would, after some rows
        real_run(args, res)
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run", run_then_stop)
    text = run.main(["--quick", "--out", str(tmp_path)]).read_text()
    assert "**interrupted**" in text and "| BatchNorm |" in text


def test_cases_filter_runs_only_those_cases(tmp_path):
    md = run.main(["--quick", "--cases", "16x32", "--out", str(tmp_path)])
    assert md.name.endswith("-cases.md")
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows and all("| 16x32 |" in line for line in rows)
    assert not list(tmp_path.glob("*-sweep.png"))  # no sweep case matched: no plot


def test_a_second_run_the_same_day_keeps_the_first_runs_file(tmp_path):
    res = dict(rows=[], sweep=[], copy_bw=1e9, mm_rate=1e9, device=torch.device("cpu"), threads=1)
    args = argparse.Namespace(quick=True, cases=None, out=str(tmp_path))
    first = run.write_results(res, args)
    first.write_text("first run")
    second = run.write_results(res, args)
    assert second != first and second.name.endswith("-run2.md") and first.read_text() == "first run"


def _row(case, lo, hi):
    return dict(group="BatchNorm", case=case, mode="fwd+bwd", dtype=torch.float32, layout="contiguous",
                fastbn_ms=1.0, torch_ms=1.0, ratio=(lo + hi) / 2, ratio_mid=(lo + hi) / 2, ratio_lo=lo, ratio_hi=hi,
                compiled_ms=None, achieved="-", roof="-")


def test_rows_slower_in_every_round_are_listed(tmp_path):
    rows = [_row("2x3", 0.80, 0.95), _row("4x5", 0.90, 1.10), _row("6x7", 1.20, 1.50), _row("8x9", 0.97, 0.99)]
    # 4x5 won a round: drift, not a loss; 8x9 lost each round by under 2%: parity
    assert [r["case"] for r in run.slower_every_round(rows)] == ["2x3"]
    res = dict(rows=rows, sweep=[], copy_bw=1e9, mm_rate=1e9, device=torch.device("cpu"), threads=1)
    text = run.write_results(res, argparse.Namespace(quick=True, cases=None, out=str(tmp_path))).read_text()
    listed = text.split("Slower than torch in every round")[1]
    assert "2x3" in listed and "4x5" not in listed and "6x7" not in listed and "8x9" not in listed
    res["rows"] = rows[1:]
    text = run.write_results(res, argparse.Namespace(quick=True, cases=None, out=str(tmp_path))).read_text()
    assert "Slower than torch in every round" not in text


def test_fused_threshold_shapes_straddle_the_limit_and_it_needs_cuda():
    from benchmarks import fused_threshold

    per_channel = [torch.Size(shape).numel() // shape[1] for shape, _ in fused_threshold.SHAPES]
    assert min(per_channel) < 32 * 256 < max(per_channel)  # the CUDA fused kernels' limit (kFusedValues)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs CUDA"):
            fused_threshold.main([])


@pytest.mark.parametrize("shape,layout", [((8, 16), []), ((4, 3, 5, 5), []), ((4, 3, 5, 5), ["--channels-last"])])
def test_step_breakdown_table_has_every_part(shape, layout, capsys):
    from benchmarks import step_breakdown

    lines = step_breakdown.main(["--shape", "x".join(map(str, shape)), "--rounds", "1", "--min-run-time", "0.001",
                                 *layout])
    parts = [line.split(" | ")[0].lstrip("| ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert parts == ["step", "forward", "backward", "ops", "framework (step - ops, per round)"]
    assert "commit" in lines[0] and "torch" in lines[0]
    assert capsys.readouterr().out.strip().endswith(lines[-1])


def test_step_breakdown_checks_its_ops_against_its_step(monkeypatch):
    # The `ops` part must compute what the step computes, or the breakdown compares different work.
    from benchmarks import step_breakdown

    real = step_breakdown.side_fns

    def wrong_ops(side, shape, device, channels_last=False, seed=0):
        fns, (from_step, from_ops) = real(side, shape, device, channels_last, seed)
        return fns, (from_step, tuple(2 * g for g in from_ops))

    monkeypatch.setattr(step_breakdown, "side_fns", wrong_ops)
    with pytest.raises(AssertionError, match="fastbn input gradient"):
        step_breakdown.measure((8, 16), torch.device("cpu"), 1, 1, 0.001)


def test_step_breakdown_rejects_a_bad_shape():
    from benchmarks import step_breakdown

    for bad in ("8", "8xa", "0x4"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a shape such as 200x1000"):
            step_breakdown.parse_shape(bad)
    with pytest.raises(SystemExit):  # argparse's error: channels_last needs 4D or 5D
        step_breakdown.main(["--shape", "8x16", "--channels-last"])


def test_autograd_nodes_table_has_a_row_per_case_and_checks_the_gradients(monkeypatch):
    from benchmarks import autograd_nodes

    cases = [("bn", "bn", (8, 3, 2), "train"), ("linear first", "linear", (5, 4, 3), "params")]
    lines = autograd_nodes.main(["--rounds", "1", "--min-run-time", "0.001"], cases=cases)
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[-2:]] == ["bn", "linear first"]
    assert "commit" in lines[0] and "torch" in lines[0]
    # a node whose gradients differ from the Function's is caught before anything is timed
    monkeypatch.setattr(autograd_nodes._C.eager, "batch_norm_autograd",
                        lambda *args: 2 * autograd_nodes.ops.BatchNormFunction.apply(*args))
    with pytest.raises(AssertionError, match="bn: the node's gradients differ"):
        autograd_nodes.measure(torch.device("cpu"), 1, 1, 0.001, cases[:1])
