"""Packaging for tacq-kernels (runtime ``tacq_kernels``) and its quantizer (``tacq_quant``).

torch is deliberately *not* pinned to a build: the Makefile keeps a torch that is already
importable and otherwise installs one before this package, so pip never pulls gigabytes of
CUDA wheels onto a CPU machine.
"""

from setuptools import setup

setup(
    name="tacq-kernels",
    version="0.1.0",
    description="Fused 2/3-bit dequantize-and-multiply kernels with sparse fp16 outliers, and a TACQ/CLAQ quantizer",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tacq_kernels", "tacq_kernels.kernels", "tacq_quant"],
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
        "test": ["pytest", "hypothesis", "transformers>=4.57", "accelerate", "gguf"],
        "bench": ["matplotlib"],  # the benchmarks' plots (benchmarks/*.py); make test installs it
    },
    entry_points={"console_scripts": ["tacq=tacq_quant.cli:main"]},
)
