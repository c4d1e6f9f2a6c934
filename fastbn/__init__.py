"""fastbn: BatchNorm and fused Linear+LeakyReLU as C++/CUDA PyTorch ops.

    import fastbn
    bn = fastbn.nn.BatchNorm2d(64)                 # drop-in for torch.nn.BatchNorm2d
    model = fastbn.convert(torchvision_model)      # swap every torch BatchNorm for ours
    fastbn.build_info()                            # what this build contains
"""
__version__ = "0.1.0"

try:
    import torch
except ImportError:  # the NumPy parts (fastbn.numpy_mlp, fastbn.data) work without torch
    torch = None


def _load_library():
    try:
        from fastbn._built_against import TORCH_VERSION as built_against
    except ImportError:
        built_against = None
    if built_against is not None and built_against.split("+")[0] != torch.__version__.split("+")[0]:
        raise ImportError(
            f"fastbn was built against torch {built_against} but torch {torch.__version__} is "
            "installed; its compiled kernels cannot be loaded. Rebuild it under this torch: "
            "pip install --no-build-isolation -e ."
        )
    try:
        from fastbn import _C
    except ImportError as e:
        raise ImportError(
            f"fastbn's compiled library could not be loaded ({e}). Build it first: "
            "pip install --no-build-isolation -e .  (see README.md)"
        ) from e
    return _C


if torch is not None:
    _C = _load_library()
    from fastbn import ops  # noqa: E402  (registers fake kernels: needs the schemas loaded above)
    from fastbn import functional, nn  # noqa: E402
    from fastbn.nn import convert  # noqa: E402


def build_info() -> dict:
    """What this build of fastbn contains, as reported by the compiled library itself."""
    return {
        "version": _C.version,
        "torch_built_against": _C.torch_version,
        "torch_running": torch.__version__,
        "cpu_isa": _C.cpu_isa(),
        "cpu_threads": _C.num_threads(),
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.replace(" ", ";").split(";") if a],
    }


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (/proc/cpuinfo), for results that name their machine;
    platform.processor() says only "x86_64" on Linux."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def empty_cache() -> None:
    """Return the cached blocks of large CPU outputs to the system (see csrc/cpu/output_allocator.h)."""
    _C.empty_cpu_cache()


def cpu_cache_stats() -> dict:
    """Bytes held by the cache of large CPU outputs, and its hit/miss counts."""
    cached, hits, misses = _C.cpu_cache_stats()
    return {"cached_bytes": cached, "hits": hits, "misses": misses}


__all__ = ["functional", "nn", "ops", "convert", "build_info", "cpu_model", "empty_cache", "cpu_cache_stats",
           "__version__"]
