"""vLLM plugin: serve tacq_kernels checkpoints with ``vllm serve`` / ``vllm.LLM``, with tensor parallelism.

vLLM finds this module through the ``vllm.general_plugins`` entry point (``setup.py``), in the
main process and in every worker, and calls :func:`register`. That registers the quantization
method ``"tacq_kernels"``, the ``quant_method`` of every checkpoint's ``config.json``, so vLLM
picks it with no flag. This module imports vLLM; nothing else in tacq_kernels imports this module
(vLLM is an optional dependency). Its classes live at module level because vLLM pickles the
quantization config into its engine and worker processes.

How a checkpoint is served (docs/vllm.md):

* Every linear layer that vLLM builds for a listed module gets :class:`TacqLinearMethod`. A merged
  layer (``qkv_proj``, ``gate_up_proj``) has one *part* per checkpoint layer (``q_proj``,
  ``k_proj``, ``v_proj``; ``gate_proj``, ``up_proj``): parts may differ in segments, permutation
  and nnz, and stay separate format-v1 layers whose outputs are concatenated.
* Tensor parallelism: a column-parallel part keeps the output rows of its rank, a row-parallel
  layer the input columns of its rank, both through :func:`tacq_kernels.format.slice_layer`.
  A split that cannot be honoured (an affine group cut, an act-order layer with groups cut along
  K, a size the TP degree does not divide) raises :class:`ShardError`, naming the layer, the TP
  size and the reason, when vLLM asks for the first quantization method, before any weight of
  the model is allocated.
* Loading: each checkpoint tensor arrives whole (vLLM's loader passes it with the part's shard
  id); once a part has all its tensors it is validated, sliced to this rank's shard and the whole
  tensors are dropped, so a rank holds only its shard plus one part in flight.
* Forward: one ``torch.ops.tacq_kernels.quant_linear`` call per part (Triton on CUDA, the
  reference on CPU), so it composes with vLLM's torch.compile and CUDA graphs. On CUDA the
  kernels are tuned in ``process_weights_after_loading`` (:func:`tacq_kernels.ops.warmup_layers`),
  before vLLM captures graphs.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.utils import set_weight_attrs

from . import ops
from .format import QUANT_METHOD, CheckpointError, LayerSpec, PackedLayer, parse_quantization_config, slice_layer, slice_problem

# vLLM's merged linears of Llama-family models and the checkpoint layers they hold, in output order.
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}
QKV_SHARD_IDS = ("q", "k", "v")
# Checkpoint layers by how vLLM splits them across ranks (Llama family).
ROW_PARALLEL = ("o_proj", "down_proj")
COLUMN_PARALLEL = ("q_proj", "gate_proj", "up_proj")
# On CPU the reference path decodes each part at every call (transient fp32 [N, K] per part);
# TACQ_KERNELS_VLLM_CPU_CACHE=1 keeps the decoded fp32 weight of every shard instead (faster,
# 32/bits times the packed size in memory).
CPU_CACHE_ENV = "TACQ_KERNELS_VLLM_CPU_CACHE"


class ShardError(ValueError):
    """A tensor-parallel split that a tacq_kernels layer cannot honour."""

    def __init__(self, layer: str, tp_size: int, reason: str):
        super().__init__(f"tacq_kernels cannot shard layer '{layer}' for tensor_parallel_size={tp_size}: {reason}")
        self.layer, self.tp_size, self.reason = layer, tp_size, reason


# --------------------------------------------------------------------------------------------
# The shard plan: which rows / columns of each checkpoint layer a rank keeps (no vLLM here).
# --------------------------------------------------------------------------------------------


def part_rows(n_full: int, n_rank: int, shard_rank: int, layer: str, tp_size: int) -> range:
    rows = range(shard_rank * n_rank, (shard_rank + 1) * n_rank)
    if n_rank <= 0 or rows.stop > n_full:
        raise ShardError(layer, tp_size, f"output rows {rows.start}..{rows.stop} of {n_full} do not exist")
    return rows


def part_cols(spec: LayerSpec, k_rank: int, tp_rank: int, layer: str, tp_size: int) -> range:
    cols = range(tp_rank * k_rank, (tp_rank + 1) * k_rank)
    if k_rank <= 0 or cols.stop > spec.in_features:
        raise ShardError(layer, tp_size, f"input columns {cols.start}..{cols.stop} of {spec.in_features} do not exist")
    problem = slice_problem(spec, cols)
    if problem:
        raise ShardError(layer, tp_size, problem)
    return cols


def check_tensor_parallel(specs: dict[str, LayerSpec], tp_size: int) -> None:
    """Refuse, before anything is allocated, a TP degree that some layer cannot be split for.

    Row-parallel layers (``o_proj``, ``down_proj``) split K into ``tp_size`` equal ranges, each of
    which must be a valid :func:`slice_problem` cut; column-parallel ones (``q_proj``,
    ``gate_proj``, ``up_proj``) split N evenly. (``k_proj``/``v_proj`` follow the KV heads, which
    vLLM checks itself; every layer is checked again exactly when vLLM creates it.)
    """
    if tp_size <= 1:
        return
    for name, spec in specs.items():
        leaf = name.rpartition(".")[2]
        if leaf in ROW_PARALLEL:
            if spec.in_features % tp_size:
                raise ShardError(name, tp_size, f"in_features={spec.in_features} is not divisible by {tp_size}")
            k_rank = spec.in_features // tp_size
            for r in range(tp_size):
                part_cols(spec, k_rank, r, name, tp_size)
        elif leaf in COLUMN_PARALLEL and spec.out_features % tp_size:
            raise ShardError(name, tp_size, f"out_features={spec.out_features} is not divisible by {tp_size}")


def warmup_batch_sizes() -> tuple[int, ...]:
    """The batch sizes to tune before vLLM captures CUDA graphs: exactly its capture sizes.

    Other sizes are tuned when first seen, in eager runs (vLLM's profile run, prefill), where
    timing is allowed. Without a current vLLM config (or graphs off): the ops' default list.
    """
    try:
        from vllm.config import get_current_vllm_config_or_none

        cfg = get_current_vllm_config_or_none()
        sizes = cfg.compilation_config.cudagraph_capture_sizes if cfg is not None else None
    except Exception:
        sizes = None
    return tuple(sorted(set(int(m) for m in sizes))) if sizes else ops.DEFAULT_WARMUP_BATCH_SIZES


def _tp_world_size() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_world_size

        return int(get_tensor_model_parallel_world_size())
    except Exception:  # not initialised (e.g. building a layer outside an engine)
        return 1


# --------------------------------------------------------------------------------------------
# Registration and the vLLM classes
# --------------------------------------------------------------------------------------------

_REGISTERED = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register ``tacq_kernels`` with vLLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.model_executor.layers import quantization as q

    if QUANT_METHOD not in q.QUANTIZATION_METHODS:
        q.register_quantization_config(QUANT_METHOD)(TacqKernelsConfig)
    _REGISTERED = True


class TacqKernelsConfig(QuantizationConfig):
    """The ``quantization_config`` of a tacq_kernels checkpoint (docs/format.md)."""

    def __init__(self, config: dict):
        super().__init__()
        self.raw = dict(config)
        self.specs = parse_quantization_config(config)
        self.modules_to_not_convert = list(config.get("modules_to_not_convert") or [])
        self._checked_tp: int | None = None

    def __repr__(self) -> str:
        return f"TacqKernelsConfig(method={self.raw.get('method')!r}, layers={len(self.specs)})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1  # Triton on any CUDA GPU; the reference elsewhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config block of config.json

    @classmethod
    def from_config(cls, config: dict) -> "TacqKernelsConfig":
        return cls(config)

    def _parts(self, prefix: str) -> list[str] | None:
        """The checkpoint layers behind vLLM's module ``prefix`` (None: not quantized)."""
        if prefix in self.specs:
            return [prefix]
        parent, _, leaf = prefix.rpartition(".")
        mapping = dict(DEFAULT_PACKED_MODULES)
        mapping.update(getattr(self, "packed_modules_mapping", None) or {})
        if leaf in mapping:
            parts = [f"{parent}.{p}" if parent else p for p in mapping[leaf]]
            present = [p in self.specs for p in parts]
            if all(present):
                return parts
            if any(present):
                missing = [p for p, ok in zip(parts, present) if not ok]
                raise CheckpointError(f"merged layer {prefix}: parts {missing} are not quantized in the checkpoint "
                                      "while the others are; tacq_kernels needs all or none")
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        tp = _tp_world_size()
        if self._checked_tp != tp:  # first call: before the embedding, so before any allocation
            check_tensor_parallel(self.specs, tp)
            self._checked_tp = tp
        if not isinstance(layer, LinearBase):
            return None
        parts = self._parts(prefix)
        if parts is None:
            return UnquantizedLinearMethod()
        return TacqLinearMethod(self, prefix, parts)

class TacqLinearMethod(LinearMethodBase):
    """One vLLM linear (plain or merged) backed by format-v1 layers, sharded for this rank."""

    def __init__(self, config: TacqKernelsConfig, prefix: str, parts: list[str]):
        self.config = config
        self.prefix = prefix
        self.parts = parts

    # -- shard plan and placeholders -------------------------------------------------------
    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        tp_size = int(getattr(layer, "tp_size", 1) or 1)
        tp_rank = int(getattr(layer, "tp_rank", 0) or 0)
        specs = [self.config.specs[p] for p in self.parts]
        if len(output_partition_sizes) != len(specs):
            raise CheckpointError(f"vLLM builds {len(output_partition_sizes)} output parts for {self.prefix}, "
                                  f"the checkpoint has {len(specs)} layers {self.parts}")
        row_parallel = input_size_per_partition != input_size
        plan = []
        for i, (name, spec, n_rank) in enumerate(zip(self.parts, specs, output_partition_sizes)):
            if spec.in_features != input_size:
                raise CheckpointError(f"vLLM's {self.prefix} has input_size={input_size}, the checkpoint layer "
                                      f"has in_features={spec.in_features}", name)
            if row_parallel:
                if n_rank != spec.out_features:
                    raise CheckpointError(f"vLLM's {self.prefix} has {n_rank} outputs, the checkpoint layer "
                                          f"has out_features={spec.out_features}", name)
                for r in range(tp_size):  # every rank's cut, so all ranks fail alike
                    part_cols(spec, input_size_per_partition, r, name, tp_size)
                plan.append((None, part_cols(spec, input_size_per_partition, tp_rank, name, tp_size)))
            else:
                replicas = 1
                if len(self.parts) == 3 and i > 0:  # k, v: KV heads may be replicated over ranks
                    replicas = int(getattr(layer, "num_kv_head_replicas", 1) or 1)
                if n_rank * tp_size // replicas != spec.out_features:
                    raise ShardError(name, tp_size, f"out_features={spec.out_features} cannot give each rank "
                                                    f"{n_rank} rows")
                plan.append((part_rows(spec.out_features, n_rank, tp_rank // replicas, name, tp_size), None))
        layer.tacq_plan = plan
        layer.tacq_specs = specs
        layer.tacq_received = [dict() for _ in specs]
        layer.tacq_shards = [None] * len(specs)
        layer.tacq_first_rank = tp_rank == 0
        # One placeholder parameter per tensor name used by any part (bias excluded: vLLM owns
        # it). vLLM routes each checkpoint tensor to it with the part's shard id.
        names: dict[str, torch.dtype] = {}
        for spec in specs:
            for tname, (_, dtype) in spec.tensor_specs().items():
                if tname != "bias":
                    names.setdefault(tname, dtype)
        for tname, dtype in names.items():
            p = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            set_weight_attrs(p, {"weight_loader": self._loader(layer, tname)})
            layer.register_parameter(tname, p)
        layer.tacq_placeholders = list(names)

    def _loader(self, layer, tname: str):
        def weight_loader(param, loaded_weight, loaded_shard_id=None, *args, **kwargs):
            if loaded_shard_id is None:  # vLLM >= 0.30 attaches it to the tensor (WeightsMapper)
                loaded_shard_id = getattr(loaded_weight, "shard_id", None)
            i = self._part_index(loaded_shard_id)
            name, spec = self.parts[i], layer.tacq_specs[i]
            if tname not in spec.tensor_specs():
                raise CheckpointError("unexpected tensor (not in the layer spec)", name, tname)
            layer.tacq_received[i][tname] = loaded_weight
            wanted = [t for t in spec.tensor_specs() if t != "bias"]
            if all(t in layer.tacq_received[i] for t in wanted):
                self._finish_part(layer, i)
        return weight_loader

    def _part_index(self, shard_id) -> int:
        if shard_id is None:
            if len(self.parts) != 1:
                raise CheckpointError(f"a tensor for merged layer {self.prefix} came without a shard id")
            return 0
        if isinstance(shard_id, str):
            return QKV_SHARD_IDS.index(shard_id)
        return int(shard_id)

    def _finish_part(self, layer, i: int) -> None:
        name, spec = self.parts[i], layer.tacq_specs[i]
        got = layer.tacq_received[i]
        no_bias = dataclasses.replace(spec, has_bias=False)
        full = PackedLayer(no_bias, {t: got[t].cpu() for t in no_bias.tensor_specs()}, name)  # validates
        rows, cols = layer.tacq_plan[i]
        shard = slice_layer(full, rows=rows, cols=cols, bias=False) if (rows or cols) else full
        device = getattr(layer, layer.tacq_placeholders[0]).device
        layer.tacq_shards[i] = shard.to(device)
        layer.tacq_received[i] = {}

    # -- after loading: shards become buffers, op arguments, kernel tuning ----------------
    def process_weights_after_loading(self, layer) -> None:
        if getattr(layer, "tacq_ready", False):
            return
        device = getattr(layer, layer.tacq_placeholders[0]).device
        for i, shard in enumerate(layer.tacq_shards):
            if shard is None:
                spec = layer.tacq_specs[i]
                missing = [t for t in spec.tensor_specs() if t != "bias" and t not in layer.tacq_received[i]]
                raise CheckpointError("was not loaded from the checkpoint", self.parts[i], missing[0] if missing else None)
        for tname in layer.tacq_placeholders:
            delattr(layer, tname)
        args = []
        for i, shard in enumerate(layer.tacq_shards):
            names = list(shard.spec.tensor_specs())
            tensors = []
            for tname in names:
                buf = shard.tensors[tname].to(device)
                layer.register_buffer(f"tacq{i}_{tname}", buf, persistent=False)
                tensors.append(buf)
            args.append((tensors, ops.spec_to_ints(shard.spec)))
        layer.tacq_args = args
        layer.tacq_out_features = [s.spec.out_features for s in layer.tacq_shards]
        layer.tacq_dense = None
        if device.type == "cpu" and os.environ.get(CPU_CACHE_ENV, "0") not in ("", "0"):
            from . import reference

            layer.tacq_dense = [reference.dequantize(s) for s in layer.tacq_shards]
        layer.tacq_shards = None  # the buffers hold them now
        layer.tacq_ready = True
        if device.type == "cuda":
            dtype = getattr(layer, "params_dtype", None) or torch.float16
            ops.warmup_layers(args, batch_sizes=warmup_batch_sizes(),
                              dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if layer.tacq_dense is not None:
            outs = [(x2.float() @ w.t()).to(x.dtype) for w in layer.tacq_dense]
        else:
            x2 = x2.contiguous()
            outs = [ops.quant_linear(x2, tensors, ints) for tensors, ints in layer.tacq_args]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])
