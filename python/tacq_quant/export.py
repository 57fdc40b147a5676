"""Writing a quantized model as a tacq-kernels checkpoint directory (format v1, docs/format.md)."""

from __future__ import annotations

import os
from typing import Mapping

import torch

from tacq_kernels import PackedLayer, replace_linear
from tacq_kernels.hf import quantization_config_for

CARD = """# {name}

Quantized with tacq-kernels ({method}). Load it with:

```python
import tacq_kernels  # registers the "tacq_kernels" checkpoint format with transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{path}")
```

This needs the `tacq-kernels` package (`pip install tacq-kernels`). Installed, it registers the
format by itself in any process that loads this checkpoint through transformers (lm-eval,
pipelines, ...), even without `import tacq_kernels`. Where the package is missing, transformers
warns "Unknown quantization type, got tacq_kernels" and the quantized layers are NOT loaded
(random weights).
"""


def save_quantized(
    model: torch.nn.Module,
    layers: Mapping[str, PackedLayer],
    out_dir: str | os.PathLike,
    tokenizer=None,
    method: str = "tacq",
    method_args: Mapping | None = None,
    dtype: torch.dtype | None = torch.float16,
    overwrite: bool = False,
    extra_files: Mapping[str, str] | None = None,
    log=None,
) -> str:
    """Swap the model's linears for the packed layers (in place) and save it as a checkpoint.

    Unquantized tensors (embeddings, norms, lm_head) are cast to ``dtype`` (None keeps them);
    the packed tensors keep their format dtypes. Writes config.json (with the
    ``quantization_config`` block), model.safetensors, the tokenizer, a short README and
    ``extra_files`` (name -> text). Returns the directory.

    The write is atomic (:func:`tacq_kernels.atomic.atomic_directory`): everything goes into a
    temporary sibling directory, which is re-read through the format's validation and then
    renamed to ``out_dir``. A non-empty ``out_dir`` is replaced only with ``overwrite`` (and stays
    complete and loadable until the new checkpoint is in place); an interrupted write leaves no
    half-written checkpoint under the name.
    """
    from tacq_kernels.atomic import atomic_directory, test_point

    out_dir = os.fspath(out_dir)
    if not layers:
        raise ValueError("no quantized layers to save")
    replace_linear(model, layers)
    if dtype is not None:
        model.to(dtype)  # QuantLinear keeps its buffers' dtypes
    model.config.quantization_config = quantization_config_for(layers, method, method_args)
    with atomic_directory(out_dir, overwrite=overwrite, log=log) as tmp:
        model.save_pretrained(tmp)
        test_point("write:safetensors")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(CARD.format(name=os.path.basename(os.path.abspath(out_dir)), method=method, path=out_dir))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
    return out_dir
