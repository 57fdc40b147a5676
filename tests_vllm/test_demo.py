"""The default model's TACQ checkpoint (`make demo`) under vLLM TP = 3 answers the demo prompt as
`tacq generate` does (vLLM refuses TP = 2 for its 9 heads; see demo_check.py).

Needs the checkpoint (135M parameters, minutes to make): set TACQ_VLLM_DEMO_CKPT to its directory
(`make demo` writes runs/demo). Skipped without it. The check itself is tests_vllm/demo_check.py
(also a command: `python tests_vllm/demo_check.py CHECKPOINT`).
"""

import os

import pytest

from demo_check import check

DEMO = os.environ.get("TACQ_VLLM_DEMO_CKPT")


@pytest.mark.skipif(not DEMO or not os.path.exists(os.path.join(DEMO or "", "config.json")),
                    reason="set TACQ_VLLM_DEMO_CKPT to the checkpoint `make demo` writes (runs/demo)")
def test_demo_checkpoint_tp3_answers_like_tacq_generate(tmp_path):
    want, got, seconds = check(DEMO, int(os.environ.get("TACQ_VLLM_DEMO_TOKENS", "32")), str(tmp_path))
    print(f"tacq generate: {want!r}\nvLLM TP=3:     {got!r}\nseconds: {seconds}")
    assert got == want
