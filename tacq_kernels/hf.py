"""Hugging Face ``transformers`` integration.

``import tacq_kernels`` registers a quantization config and a quantizer for
``quant_method = "tacq_kernels"`` with transformers, so that a checkpoint written by
``tacq_quant`` (or by ``model.save_pretrained`` after :func:`replace_linear`) loads with

    model = AutoModelForCausalLM.from_pretrained(ckpt_dir)

Before any weight is read, the quantizer validates the checkpoint's quantized layers against
their specs in ``config.json`` (:func:`tacq_kernels.format.validate_layer`), so a corrupt or
mismatched checkpoint raises :class:`~tacq_kernels.CheckpointError` naming the layer and tensor
and nothing is loaded. Then it swaps every listed ``nn.Linear`` for a :class:`QuantLinear` of the
exact on-disk shapes, and transformers fills their buffers.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from .format import (
    FORMAT_VERSION,
    QUANT_METHOD,
    CheckpointError,
    LayerSpec,
    PackedLayer,
    make_quantization_config,
    parse_quantization_config,
    safetensors_files,
    validate_layer,
)
from .module import QuantLinear


def _resolve(model: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        child = getattr(parent, attr)
    except AttributeError as e:
        raise CheckpointError("no such module in the model", name) from e
    return parent, attr, child


def replace_linear(
    model: nn.Module,
    layers: Mapping[str, PackedLayer | LayerSpec],
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace the ``nn.Linear`` modules named in ``layers`` by :class:`QuantLinear` (in place).

    ``layers`` maps a module path (``"model.layers.0.mlp.up_proj"``) to a :class:`PackedLayer`
    (its tensors are copied in) or to a :class:`LayerSpec` (buffers are allocated empty, to be
    filled by ``load_state_dict``). The shapes and bias of each module must match its layer.
    Returns the model.
    """
    for name, layer in layers.items():
        parent, attr, old = _resolve(model, name)
        spec = layer.spec if isinstance(layer, PackedLayer) else layer
        if isinstance(old, nn.Linear):
            old_bias = old.bias is not None
        elif isinstance(old, QuantLinear):
            old_bias = old.spec.has_bias
        else:
            raise CheckpointError(f"expected nn.Linear, found {type(old).__name__}", name)
        if (old.in_features, old.out_features) != (spec.in_features, spec.out_features):
            raise CheckpointError(
                f"module is [{old.out_features}, {old.in_features}] but the quantized layer is "
                f"[{spec.out_features}, {spec.in_features}]",
                name,
            )
        if old_bias != spec.has_bias:
            raise CheckpointError(f"module bias={old_bias} but the quantized layer has bias={spec.has_bias}", name)
        if isinstance(layer, PackedLayer):
            new = QuantLinear.from_packed(PackedLayer(layer.spec, layer.tensors, name, check=False))
            if device is not None:
                new = new.to(device)
        else:
            new = QuantLinear(spec, name=name, device=device)
        setattr(parent, attr, new)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """The model's :class:`QuantLinear` modules by path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def validate_checkpoint_files(files: list[str], specs: Mapping[str, LayerSpec]) -> None:
    """Read every quantized layer's tensors from safetensors files and validate them.

    Only the quantized layers' tensors are read. Raises :class:`CheckpointError` naming the
    layer and tensor on the first problem (or the file, when it cannot be read).
    """
    from safetensors import SafetensorError, safe_open

    wanted = {f"{name}.{t}": (name, t) for name, spec in specs.items() for t in spec.tensor_specs()}
    prefixes = {f"{name}." for name in specs}
    found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in specs}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path} is not a safetensors file; tacq_kernels checkpoints are safetensors only")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    if key in wanted:
                        name, t = wanted[key]
                        found[name][t] = f.get_tensor(key)
                    elif key.rpartition(".")[0] + "." in prefixes:
                        raise CheckpointError("unexpected tensor (not in the layer spec)", key.rpartition(".")[0],
                                              key.rpartition(".")[2])
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
    for name, spec in specs.items():
        validate_layer(name, spec, found[name])


def check_every_linear_loaded(model: nn.Module, files: list[str], specs: Mapping[str, LayerSpec]) -> None:
    """Refuse a checkpoint that would leave some linear randomly initialised.

    Every ``nn.Linear`` of the model that the ``layers`` table does not list must have its
    ``weight`` in the checkpoint (or share it with the input embeddings: a tied ``lm_head``).
    Quantized tensors (``<layer>.seg0_*``, ``<layer>.sparse_*``) of a layer the table does not list
    are refused as well, naming the layer: the table and the weights disagree.
    """
    from safetensors import safe_open

    keys: set[str] = set()
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys.update(f.keys())
        except Exception as e:  # noqa: BLE001 - reported with the file name
            raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
    for key in sorted(keys):
        owner, _, tname = key.rpartition(".")
        if owner not in specs and (tname.startswith("seg") and "_" in tname or tname.startswith("sparse_")):
            raise CheckpointError(
                "the checkpoint holds quantized tensors of this layer but quantization_config's 'layers' table "
                "does not list it", owner, tname)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embed_weight = getattr(embed, "weight", None)
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name in specs:
            continue
        if f"{name}.weight" in keys or module.weight is embed_weight:
            continue
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if tied and module is out:
            continue
        raise CheckpointError(
            "is neither in quantization_config's 'layers' table nor stored as a plain weight in the checkpoint; "
            "it would load randomly initialised", name)


# --------------------------------------------------------------------------------------------
# transformers registration
# --------------------------------------------------------------------------------------------

_REGISTERED = False
# transformers 4.x casts every floating checkpoint tensor to the model dtype while loading.
TRANSFORMERS_CASTS_BUFFERS = False


def register_with_transformers() -> bool:
    """Register the ``tacq_kernels`` config and quantizer with transformers (idempotent).

    Returns False when transformers is not installed. Called by ``import tacq_kernels``.
    """
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZATION_CONFIG_MAPPING,
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
    except ImportError:
        return False
    config_cls, quantizer_cls = _make_transformers_classes()
    # Guard against double registration (e.g. a module reloaded in a notebook): transformers
    # raises if a name is registered twice.
    # tacq_kernels_autoload may have registered a placeholder that refuses to load (autoload off
    # or failed): the real config replaces it.
    if getattr(AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD), "tacq_kernels_placeholder", False):
        del AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer_cls)
    _REGISTERED = True
    return True


def _make_transformers_classes():
    global TRANSFORMERS_CASTS_BUFFERS
    import transformers
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    TRANSFORMERS_CASTS_BUFFERS = int(transformers.__version__.split(".")[0]) < 5

    class TacqKernelsConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a tacq-kernels checkpoint (see docs/format.md)."""

        def __init__(
            self,
            layers: Mapping | None = None,
            method: str | None = None,
            method_args: Mapping | None = None,
            modules_to_not_convert: list[str] | None = None,
            format_version: int = FORMAT_VERSION,
            **kwargs,
        ):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.method = method
            self.method_args = dict(method_args or {})
            self.modules_to_not_convert = list(modules_to_not_convert or ["lm_head"])
            # None stays None (not {}): a missing table must be reported as missing, not load nothing
            self.layers = None if layers is None else dict(layers) if isinstance(layers, Mapping) else layers

        def to_dict(self) -> dict:
            return {
                "quant_method": QUANT_METHOD,
                "format_version": self.format_version,
                "method": self.method,
                "method_args": dict(self.method_args),
                "modules_to_not_convert": list(self.modules_to_not_convert),
                "layers": dict(self.layers) if isinstance(self.layers, Mapping) else self.layers,
            }

        def to_diff_dict(self) -> dict:
            return self.to_dict()

        def layer_specs(self) -> dict[str, LayerSpec]:
            return parse_quantization_config(self.to_dict())

    class TacqKernelsHfQuantizer(HfQuantizer):
        """Loads tacq-kernels checkpoints (quantizing happens in ``tacq_quant``, not here).

        transformers 5.x keeps each checkpoint tensor in the dtype of the module's (empty)
        buffer, so the format's dtypes survive as they are. transformers 4.x casts every
        floating tensor to the model dtype first; there our buffers are routed through
        ``create_quantized_param``, which puts them back in their format dtype (exact from fp16
        or fp32; bf16 would round fp16 scales, so 4.x refuses dtype=bfloat16).
        """

        requires_calibration = True
        requires_parameters_quantization = True  # transformers 4.x: route our buffers below

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self._validated_files = False

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError(
                    "tacq_kernels only loads checkpoints that are already quantized; "
                    "make one with `tacq quantize` (the tacq_quant package)"
                )

        def update_dtype(self, dtype):
            if TRANSFORMERS_CASTS_BUFFERS and dtype == torch.bfloat16:
                raise ValueError(
                    "with transformers 4.x, tacq_kernels checkpoints load with dtype=torch.float16 or "
                    "torch.float32 (4.x would round the fp16 scales through bfloat16); bf16 activations "
                    "still work after loading, or upgrade to transformers 5"
                )
            return dtype

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            specs = self.quantization_config.layer_specs()
            if not checkpoint_files:  # transformers 4.x does not pass them: find a local checkpoint
                path = getattr(model.config, "_name_or_path", "") or ""
                if os.path.isdir(path):
                    checkpoint_files = safetensors_files(path)
            replace_linear(model, specs)
            if checkpoint_files:
                validate_checkpoint_files(list(checkpoint_files), specs)
                check_every_linear_loaded(model, list(checkpoint_files), specs)
                self._validated_files = True
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, module in quantized_layers(model).items():
                for tname in module.tensor_names():
                    if getattr(module, tname).is_meta:
                        raise CheckpointError("was not loaded from the checkpoint", name, tname)
                if not self._validated_files:
                    module.validate()
            return model

        def param_needs_quantization(self, model, param_name, **kwargs) -> bool:
            # Consulted by transformers 4.x while loading (5.x asks only when quantizing on load).
            module_name, _, tname = param_name.rpartition(".")
            try:
                return isinstance(model.get_submodule(module_name), QuantLinear)
            except AttributeError:
                return False

        def check_quantized_param(self, model, param_value, param_name, *args, **kwargs) -> bool:  # 4.x < 4.56
            return self.param_needs_quantization(model, param_name)

        def create_quantized_param(self, model, param_value, param_name, target_device, *args, **kwargs):
            module_name, _, tname = param_name.rpartition(".")
            module = model.get_submodule(module_name)
            shape, dtype = module.spec.tensor_specs()[tname]
            if tuple(param_value.shape) != shape:
                raise CheckpointError(
                    f"expected shape {list(shape)} from the layer spec, got {list(param_value.shape)}", module_name, tname
                )
            module._buffers[tname] = param_value.to(device=target_device, dtype=dtype)

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    return TacqKernelsConfig, TacqKernelsHfQuantizer


def quantization_config_for(layers: Mapping[str, PackedLayer | LayerSpec], method: str, method_args=None,
                            modules_to_not_convert=("lm_head",)):
    """A transformers config object (or the plain dict without transformers) for these layers."""
    d = make_quantization_config(layers, method, method_args, modules_to_not_convert)
    if register_with_transformers():
        from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

        return AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD](**d)
    return d


def load(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | str = "auto", **kwargs):
    """Load a tacq-kernels checkpoint directory as a transformers causal LM.

    ``dtype`` is the dtype of the unquantized parts (embeddings, norms, lm_head; quantized layers
    keep their packed dtypes and compute in the activations' dtype). ``device`` e.g. ``"cuda"``.
    """
    if not register_with_transformers():
        raise ImportError("tacq_kernels.load needs transformers: pip install 'transformers>=4.57'")
    from transformers import AutoModelForCausalLM

    if device is not None:
        kwargs.setdefault("device_map", device)
    return AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=dtype, **kwargs)
