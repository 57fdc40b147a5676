"""Packaging for tacq-kernels (runtime ``tacq_kernels``) and its quantizer (``tacq_quant``).

torch is deliberately *not* pinned to a build: the Makefile keeps a torch that is already
importable and otherwise installs one before this package, so pip never pulls gigabytes of
CUDA wheels onto a CPU machine.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# --- transformers autoload (docs/integrations.md): a .pth file at the top of site-packages makes
# every interpreter run tacq_kernels_autoload.install() at start-up (stdlib only; it registers the
# checkpoint format when transformers is imported). Regular wheels get it from build_py, editable
# installs (`pip install -e .`, what `make venv` does) from editable_wheel, whose finder strategy
# would otherwise drop it.
AUTOLOAD_PTH = ("tacq_kernels_autoload.pth", "import tacq_kernels_autoload; tacq_kernels_autoload.install()\n")


class build_py_with_autoload(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            with open(os.path.join(self.build_lib, AUTOLOAD_PTH[0]), "w") as f:
                f.write(AUTOLOAD_PTH[1])

    def get_outputs(self, *args, **kwargs):
        extra = [] if self.editable_mode else [os.path.join(self.build_lib, AUTOLOAD_PTH[0])]
        return super().get_outputs(*args, **kwargs) + extra


class editable_wheel_with_autoload(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _WithAutoloadPth(super()._select_strategy(*args, **kwargs))


class _WithAutoloadPth:
    """Wraps an editable strategy: whatever it writes, the wheel also gets the .pth file."""

    def __init__(self, strategy):
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        self._strategy(wheel, files, mapping)
        wheel.writestr(*AUTOLOAD_PTH)

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self._strategy.__exit__(*exc)
# --- end transformers autoload

# --- the optional CUDA C++ GEMV (csrc/, docs/cuda.md): built with ninja when torch has CUDA and
# nvcc is present, unless TACQ_NO_CUDA_EXT=1; otherwise skipped (the package works without it).


def cuda_extension_kwargs() -> dict:
    """ext_modules/cmdclass for tacq_kernels._cuda, or {} with the reason printed."""
    reason = None
    here = os.path.dirname(os.path.abspath(__file__))
    if os.environ.get("TACQ_NO_CUDA_EXT", "0") == "1":
        reason = "TACQ_NO_CUDA_EXT=1"
    elif not os.path.exists(os.path.join(here, "csrc", "tacq_gemv.cu")):
        reason = "no csrc/ in this source tree"
    else:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError as e:  # torch is needed to build it (pip --no-build-isolation)
            reason = f"torch not importable ({e})"
        else:
            import shutil

            home_nvcc = bool(CUDA_HOME) and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
            if torch.version.cuda is None:
                reason = f"torch {torch.__version__} has no CUDA"
            elif shutil.which("nvcc") is None and not home_nvcc:
                reason = "nvcc not found (PATH, CUDA_HOME)"
    if reason is not None:
        print(f"tacq-kernels: CUDA extension not built: {reason}")
        return {}
    ext = CUDAExtension(
        "tacq_kernels._cuda",
        sources=["csrc/tacq_ops.cpp", "csrc/tacq_gemv.cu"],
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


CUDA_EXT = cuda_extension_kwargs()
# --- end CUDA extension

setup(
    name="tacq-kernels",
    version="0.1.0",
    description="Fused 2/3-bit dequantize-and-multiply kernels with sparse fp16 outliers, and a TACQ/CLAQ quantizer",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tacq_kernels", "tacq_kernels.kernels", "tacq_quant"],
    py_modules=["tacq_kernels_autoload"],  # transformers autoload, see AUTOLOAD_PTH
    package_data={"tacq_quant": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.py"]},  # `lm_eval --include_path`
    package_dir={"tacq_kernels": "tacq_kernels", "tacq_quant": "python/tacq_quant"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "hf": ["transformers>=4.57", "accelerate", "gguf", "tokenizers"],
        "harness": ["lm_eval>=0.4.13,<0.5"],  # lm-evaluation-harness: tacq eval --harness, lm_eval --include_path
        "test": ["pytest", "hypothesis", "transformers>=4.57", "accelerate", "gguf"],
        "bench": ["matplotlib"],  # the benchmarks' plots (benchmarks/*.py); make test installs it
    },
    entry_points={
        "console_scripts": ["tacq=tacq_quant.cli:main"],
        # vLLM calls every general plugin in the main process and in each worker (docs/vllm.md);
        # tacq_kernels.vllm imports vLLM only inside register().
        "vllm.general_plugins": ["tacq_kernels = tacq_kernels.vllm:register"],
    },
    cmdclass={"build_py": build_py_with_autoload, "editable_wheel": editable_wheel_with_autoload,
              **CUDA_EXT.get("cmdclass", {})},
    ext_modules=CUDA_EXT.get("ext_modules", []),
)
