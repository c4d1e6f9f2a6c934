import pytest
import torch
from hypothesis import HealthCheck, settings

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (no GPU on this machine)")

# Every kernel test runs on both backends; the CUDA half is skipped, with that reason, off-GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Random-shape tests (hypothesis): derandomized, so that every CI run draws the same cases.
RANDOM_SHAPES = settings(max_examples=100, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def dtypes_for(device):
    """Dtypes each backend supports (bfloat16 on both, float16 on CUDA only)."""
    base = [torch.float32, torch.float64, torch.bfloat16]
    return base + [torch.float16] if device == "cuda" else base


# Tolerance per dtype against a float64 reference computed from the same (rounded) inputs:
# float64 to rounding; float32 ~ 1e-5 relative; half types ~ a few units in their last place.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=3e-2, atol=5e-2),
    torch.float16: dict(rtol=5e-3, atol=1e-2),
}
