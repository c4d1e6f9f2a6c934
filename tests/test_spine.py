"""The package spine: import, build_info() tells the truth, the error paths of a build, export and
serialisation of models that use the ops."""
import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastbn

ROOT = Path(__file__).resolve().parent.parent


def test_ops_are_registered():
    for name in ("batch_norm", "batch_norm_backward_reduce", "batch_norm_backward_input", "linear_leaky_relu",
                 "leaky_relu_backward_bias"):
        assert hasattr(torch.ops.fastbn, name)
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastbn::{name}", "CPU")


def test_build_info_matches_the_binary():
    info = fastbn.build_info()
    assert info["version"] == fastbn.__version__
    assert info["torch_built_against"] == info["torch_running"] == torch.__version__
    binary = Path(fastbn._C.__file__).read_bytes()
    # CUDA kernels in the binary exactly when build_info says so, for the archs it names
    has_cubin = b"nv_fatbin" in binary or b".nv.fatbin" in binary
    assert info["cuda_kernels"] == has_cubin
    for arch in info["cuda_archs"]:
        assert f"sm_{arch.replace('.', '').replace('+PTX', '')}".encode() in binary
    # the CPU loops in use are ones this CPU can run
    assert info["cpu_isa"] in ("default", "avx2", "avx512")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if info["cpu_isa"] == "avx512":
        assert " avx512f" in flags and " avx512bw" in flags
    if info["cpu_isa"] == "avx2":
        assert " avx2" in flags and " fma" in flags


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and binutils' readelf")
def test_extension_uses_the_shared_cxx_runtime():
    # A private static copy of libstdc++ (some toolchains link one) breaks torch's errors thrown
    # from our ops: the message came out truncated here, the process crashed on a GPU image.
    needed = subprocess.run(["readelf", "-d", fastbn._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in needed, needed


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_isa_cap_and_same_results(isa):
    code = ("import torch, fastbn; torch.manual_seed(0); x = torch.randn(64, 33, 7, 5);"
            "y = fastbn.functional.batch_norm(x, None, None, training=True);"
            "print(fastbn.build_info()['cpu_isa']); torch.save(y, 'y.pt')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "FASTBN_CPU_ISA": isa}, cwd=os.environ.get("TMPDIR", "/tmp"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] in (isa, "default")
    torch.manual_seed(0)
    x = torch.randn(64, 33, 7, 5)
    y = torch.load(Path(os.environ.get("TMPDIR", "/tmp")) / "y.pt")
    torch.testing.assert_close(y, fastbn.functional.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


def test_other_torch_version_gives_a_clear_message():
    code = ("import sys, types; m = types.ModuleType('fastbn._built_against'); m.TORCH_VERSION = '1.0.0';"
            "sys.modules['fastbn._built_against'] = m\n"
            "try:\n  import fastbn\nexcept ImportError as e:\n  print('ERR', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "ERR fastbn was built against torch 1.0.0" in out.stdout and "Rebuild" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the CUDA kernels run instead")
def test_cpu_only_build_names_the_missing_backend(tmp_path):
    """Builds a CPU-only copy (FASTBN_CUDA=0) and hands its CUDA entry points a call."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", ".git", "*.so", "runs", "__pycache__"))
    env = {**os.environ, "FASTBN_CUDA": "0"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env,
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    code = ("import torch, fastbn, json; assert fastbn.__file__.startswith(%r), fastbn.__file__\n"
            "print(json.dumps(fastbn.build_info()))\n"
            "ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)\n"
            "try:\n"
            "  torch.ops.fastbn.batch_norm.default.redispatch(ks, torch.randn(4, 3), None, None, None, None, True, 0.1, 1e-5)\n"
            "except RuntimeError as e:\n  print('ERR', e)") % str(src)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=src,
                         env={**os.environ, "PYTHONPATH": str(src)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"cuda_kernels": false' in out.stdout
    assert re.search(r"ERR fastbn was built without CUDA kernels.*FASTBN_CUDA=1", out.stdout)


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), fastbn.nn.BatchNorm2d(8), torch.nn.Flatten(),
        fastbn.nn.LinearLeakyReLU(8 * 4 * 4, 5, negative_slope=0.02), fastbn.nn.BatchNorm1d(5),
    )


@pytest.mark.parametrize("training", [False, True])
def test_torch_export_keeps_the_ops_and_matches_eager(training):
    # Deployment path: the exported program calls fastbn's ops (fake kernels trace them) and
    # gives eager's output; in training the running stats are updated as in eager.
    model, x = _small_model().train(training), torch.randn(2, 3, 6, 6)
    exported = torch.export.export(copy.deepcopy(model), (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"fastbn.batch_norm.default", "fastbn.linear_leaky_relu.default"} <= targets
    runner = exported.module()
    torch.testing.assert_close(runner(x), model(x))
    torch.testing.assert_close(runner.state_dict()["1.running_mean"], model[1].running_mean)


def test_whole_model_save_load_and_deepcopy(tmp_path):
    model, x = _small_model().eval(), torch.randn(2, 3, 6, 6)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (loaded, copy.deepcopy(model)):
        assert isinstance(other[1], fastbn.nn.BatchNorm2d) and isinstance(other[3], fastbn.nn.LinearLeakyReLU)
        assert torch.equal(other(x), model(x))


def test_cpu_model_names_the_machine_in_run_logs():
    model = fastbn.cpu_model()
    assert isinstance(model, str) and model
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    if names:  # the OS's name, not platform.processor()'s "x86_64"
        assert model == names[0]
    from fastbn import train

    assert train.versions()["processor"] == model
