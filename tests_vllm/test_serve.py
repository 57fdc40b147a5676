"""`vllm serve` with TP = 2 on loopback: one completion, then 16 concurrent ones, then a clean shutdown.

Bounded: the server gets STARTUP_S to answer /health, every request has a timeout, and the
server's whole process tree is recorded while it runs and checked to be gone after SIGINT (it is
killed in any case, so a failure leaves no process behind).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil

from conftest import MAX_TOKENS, PROMPTS, hf_greedy, vllm_env
from test_engine import compare

STARTUP_S = 360


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=180):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def wait_healthy(base, proc, deadline):
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve was not healthy after {STARTUP_S} s")


def tree(pid):
    try:
        p = psutil.Process(pid)
        return {p.pid, *(c.pid for c in p.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def alive(pids):
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def as_engine_result(r):
    """A completion with logprobs and token ids, in engine_run.py's form (for test_engine.compare)."""
    lp = r["choices"][0]["logprobs"]
    tokens = [int(t.split(":")[1]) for t in lp["tokens"]]
    steps = [{str(int(k.split(":")[1])): v for k, v in top.items()} for top in lp["top_logprobs"]]
    for t, step, chosen in zip(tokens, steps, lp["token_logprobs"]):
        step.setdefault(str(t), chosen)
    return {"tokens": tokens, "logprobs": steps}


def completion(prompt, max_tokens):
    return {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "return_tokens_as_token_ids": True}


def test_serve_tp2_concurrent_completions_and_clean_shutdown(checkpoints, tmp_path):
    """The RTN 3-bit checkpoint with groups of 32 (its TP = 2 run; test_engine.py has the others)."""
    ckpt = checkpoints["rtn3g32"]
    hf = hf_greedy(ckpt, PROMPTS, MAX_TOKENS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    cmd = ["nice", "-n", "10", sys.executable, os.path.join(os.path.dirname(__file__), "vllm_cli.py"), "serve", ckpt,
           "--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "2", "--dtype", "float32",
           "--gpu-memory-utilization", "0.15", "--max-model-len", "256", "--max-num-seqs", "16",
           "--enforce-eager", "--distributed-executor-backend", "mp", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen = set()
    try:
        wait_healthy(base, proc, time.time() + STARTUP_S)
        seen |= tree(proc.pid)
        assert len(seen) >= 3  # the API server, the engine core and TP workers are separate processes

        # one request: greedy, exactly MAX_TOKENS tokens, transformers' tokens
        status, r = post(base + "/v1/completions", completion(hf[0]["prompt_ids"], MAX_TOKENS))
        assert status == 200 and r["usage"]["completion_tokens"] == MAX_TOKENS
        equal, ties, worst = compare([as_engine_result(r)], hf[:1])
        assert equal == 1, r

        # 16 at once: the test prompts (compared with transformers) and others of 2..6 tokens
        bodies = [completion(h["prompt_ids"], MAX_TOKENS) for h in hf]
        bodies += [completion(f"request {i}: ", 2 + i % 5) for i in range(16 - len(bodies))]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda b: post(base + "/v1/completions", b), bodies))
        seen |= tree(proc.pid)
        for b, (status, r) in zip(bodies, results):
            assert status == 200
            assert r["usage"]["completion_tokens"] == b["max_tokens"], r["usage"]
            assert len(as_engine_result(r)["tokens"]) == b["max_tokens"]
        equal, ties, worst = compare([as_engine_result(r) for _, r in results[: len(hf)]], hf)
        print(f"serve TP=2 rtn3g32: {equal}/{len(hf)} prompts token-identical under 16 concurrent requests, "
              f"{ties} near-tie divergences, max |logprob difference| {worst:.2e}")
        assert equal >= len(hf) - 1

        # clean shutdown: SIGINT as Ctrl-C would, then every process of the tree gone
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
        assert rc in (0, -signal.SIGINT), rc
        deadline = time.time() + 30
        while alive(seen) and time.time() < deadline:
            time.sleep(1)
        assert not alive(seen), f"stray processes after shutdown: {alive(seen)}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for pid in alive(seen):
            os.kill(pid, signal.SIGKILL)
        log.close()
        print((tmp_path / "serve.log").read_text()[-3000:])
