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

from conftest import hf_greedy, vllm_env

STARTUP_S = 360
MAX_TOKENS = 6


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


def test_serve_tp2_concurrent_completions_and_clean_shutdown(checkpoints, tmp_path):
    ckpt = checkpoints["tacq3"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "w")
    cmd = ["nice", "-n", "10", sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", ckpt,
           "--host", "127.0.0.1", "--port", str(port), "--tensor-parallel-size", "2", "--dtype", "float32",
           "--gpu-memory-utilization", "0.15", "--max-model-len", "256", "--max-num-seqs", "16",
           "--enforce-eager", "--distributed-executor-backend", "mp", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, env=vllm_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    seen = set()
    try:
        wait_healthy(base, proc, time.time() + STARTUP_S)
        seen |= tree(proc.pid)
        assert len(seen) >= 3  # the API server, the engine core and TP workers are separate processes

        # one request: greedy, exactly MAX_TOKENS tokens, the text transformers generates
        prompt = "Hello, my name is"
        status, r = post(base + "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                    "temperature": 0, "ignore_eos": True})
        assert status == 200 and r["usage"]["completion_tokens"] == MAX_TOKENS
        from transformers import AutoTokenizer

        want = hf_greedy(ckpt, [prompt], MAX_TOKENS)[0]["tokens"]
        assert r["choices"][0]["text"] == AutoTokenizer.from_pretrained(ckpt).decode(want)

        # 16 at once, each asking for another number of tokens
        bodies = [{"model": "tiny", "prompt": f"request {i}: ", "max_tokens": 2 + i % 5, "temperature": 0,
                   "ignore_eos": True} for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda b: post(base + "/v1/completions", b), bodies))
        seen |= tree(proc.pid)
        for b, (status, r) in zip(bodies, results):
            assert status == 200
            assert r["usage"]["completion_tokens"] == b["max_tokens"], r["usage"]
            assert len(r["choices"]) == 1 and isinstance(r["choices"][0]["text"], str)

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
