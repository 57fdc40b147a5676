import os

import torch

# Without a GPU, Triton kernels run in the interpreter on the CPU. The variable must be set
# before any @triton.jit function is created, i.e. before tacq_kernels' kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture
def data_dir():
    """The offline evaluation data (../shared/data or $TACQ_DATA); tests skip when it is absent."""
    path = os.environ.get("TACQ_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    if not os.path.isdir(path):
        pytest.skip(f"offline evaluation data not found at {path} (set TACQ_DATA)")
    return os.path.abspath(path)
