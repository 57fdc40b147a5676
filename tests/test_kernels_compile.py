"""The kernels compile for real GPUs (sm_80, sm_90) without a GPU, with no register spills.

The interpreter runs the kernels' Python on numpy; it never sees what Triton's GPU compiler
rejects or how many registers a config needs. Triton can compile all the way to a cubin on the
CPU, so this runs tacq_kernels.kernels.compile_check on a few representative cases (the full
sweep over every candidate config: ``python -m tacq_kernels.kernels.compile_check``). It runs in
a subprocess because this test process imported the kernels as interpreted functions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import triton


def _ptxas_present() -> bool:
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _ptxas_present(), reason="this Triton build ships no NVIDIA ptxas")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu_without_spills(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset
    result = subprocess.run(
        [sys.executable, "-m", "tacq_kernels.kernels.compile_check", "--arch", str(arch), "--smoke"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 problem config(s)" in result.stdout
