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


def offline_data_path() -> str:
    return os.environ.get("TACQ_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def english_text(tmp_path):
    """A calibration/perplexity spec: WikiText-2 when the offline data is there; otherwise this
    repository's own docs as a plain text file, so that a test runs wherever the model is."""
    raw = os.path.join(offline_data_path(), "wikitext-2-raw", "wiki.test.raw")
    if os.path.exists(raw):
        return "wikitext2:" + raw
    docs = os.path.join(os.path.dirname(__file__), "..", "docs")
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(open(os.path.join(docs, f)).read() for f in sorted(os.listdir(docs))))
    return str(path)


@pytest.fixture
def data_dir():
    """The offline evaluation data (../shared/data or $TACQ_DATA); tests skip when it is absent."""
    path = offline_data_path()
    if not os.path.isdir(path):
        pytest.skip(f"offline evaluation data not found at {path} (set TACQ_DATA)")
    return os.path.abspath(path)


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the quantizer tests run many small ops, and on a shared
    2-core CI machine extra threads only wait for busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
