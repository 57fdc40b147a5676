"""The plugin without an engine: entry point, idempotent registration, shard plans and errors."""

import importlib.metadata
import json

import pytest
import torch

from tacq_kernels import CheckpointError, make_quantization_config
from tacq_kernels.testing import random_layer
from tacq_kernels.vllm import ShardError, TacqKernelsConfig, TacqLinearMethod, check_tensor_parallel, register


def test_entry_point_is_declared_and_loads():
    eps = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "tacq_kernels"]
    assert len(eps) == 1 and eps[0].value == "tacq_kernels.vllm:register"
    assert eps[0].load() is register


def test_register_is_idempotent_and_vllm_finds_the_method():
    from vllm.model_executor.layers import quantization as q
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    register()
    register()
    assert q.QUANTIZATION_METHODS.count("tacq_kernels") == 1
    assert q.get_quantization_config("tacq_kernels") is TacqKernelsConfig


def _config(layers):
    cls = TacqKernelsConfig
    return cls.from_config(json.loads(json.dumps(make_quantization_config(layers, "test"))))


def test_merged_layers_resolve_to_their_parts(checkpoints):
    cfg_json = json.load(open(f"{checkpoints['claq2.1']}/config.json"))["quantization_config"]
    cfg = TacqKernelsConfig.from_config(cfg_json)
    qkv = cfg._parts("model.layers.0.self_attn.qkv_proj")
    assert qkv == [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    assert cfg._parts("model.layers.1.mlp.gate_up_proj") == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert cfg._parts("model.layers.1.mlp.down_proj") == ["model.layers.1.mlp.down_proj"]
    assert cfg._parts("lm_head") is None
    specs = [cfg.specs[p] for p in qkv]
    assert all(s.has_perm for s in specs) and len({s.nnz for s in specs}) > 1  # parts differ


def fake_layer(tp_size, tp_rank=0):
    layer = torch.nn.Module()
    layer.tp_size, layer.tp_rank = tp_size, tp_rank
    return layer


@pytest.mark.parametrize("tp", [2, 4])
def test_a_cut_inside_a_group_fails_before_allocation(tp):
    name = "model.layers.0.self_attn.o_proj"
    layers = {name: random_layer(64, 96, bits=3, group_size=32, name=name)}  # K/2 = 48, K/4 = 24: mid-group
    cfg = _config(layers)
    with pytest.raises(ShardError, match=rf"layer '{name}' for tensor_parallel_size={tp}: .*multiple of 32"):
        check_tensor_parallel(cfg.specs, tp)
    method = TacqLinearMethod(cfg, name, [name])
    layer = fake_layer(tp)
    with pytest.raises(ShardError, match=rf"'{name}' for tensor_parallel_size={tp}"):
        method.create_weights(layer, 96 // tp, [64], 96, 64, torch.float32)
    assert not list(layer.parameters()) and not list(layer.buffers())  # nothing allocated


def test_act_order_with_groups_cannot_be_row_parallel():
    name = "model.layers.0.mlp.down_proj"
    cfg = _config({name: random_layer(16, 128, bits=3, group_size=32, perm=True, name=name)})
    with pytest.raises(ShardError, match="act-order"):
        check_tensor_parallel(cfg.specs, 2)
    check_tensor_parallel(cfg.specs, 1)  # unsharded is fine


def test_sizes_the_tp_degree_does_not_divide():
    name = "model.layers.0.mlp.up_proj"
    cfg = _config({name: random_layer(96, 64, name=name)})
    with pytest.raises(ShardError, match="out_features=96 is not divisible by 5"):
        check_tensor_parallel(cfg.specs, 5)


def test_weight_loader_keeps_only_this_ranks_shard():
    """Column-parallel merged parts and a row-parallel layer, loaded as vLLM does, rank 1 of 2."""
    from tacq_kernels.reference import dequantize, linear

    q = random_layer(32, 64, bits=3, outlier_frac=0.05, name="m.q_proj", seed=1)
    k = random_layer(16, 64, bits=[2, 4], decoder="lut", perm=True, outlier_frac=0.1, name="m.k_proj", seed=2)
    v = random_layer(16, 64, bits=2, group_size=16, name="m.v_proj", seed=3)
    o = random_layer(64, 32, bits=3, group_size=8, outlier_frac=0.05, name="m.o_proj", seed=4)
    cfg = _config({"m.q_proj": q, "m.k_proj": k, "m.v_proj": v, "m.o_proj": o})
    Method = TacqLinearMethod

    qkv_layer, qkv = fake_layer(2, 1), Method(cfg, "m.qkv_proj", cfg._parts("m.qkv_proj"))
    qkv.create_weights(qkv_layer, 64, [16, 8, 8], 64, 64, torch.float32)
    params = dict(qkv_layer.named_parameters())
    assert all(p.numel() == 0 for p in params.values())  # placeholders only
    for shard_id, part in zip("qkv", (q, k, v)):
        for tname, t in part.tensors.items():
            params[tname].weight_loader(params[tname], t, shard_id)
    qkv.process_weights_after_loading(qkv_layer)
    assert not list(qkv_layer.parameters())
    x = torch.randn(3, 64)
    want = torch.cat([linear(x, q)[:, 16:], linear(x, k)[:, 8:], linear(x, v)[:, 8:]], 1)
    torch.testing.assert_close(qkv.apply(qkv_layer, x), want, rtol=1e-5, atol=1e-6)

    o_layer, om = fake_layer(2, 1), Method(cfg, "m.o_proj", ["m.o_proj"])
    om.create_weights(o_layer, 16, [64], 32, 64, torch.float32)
    params = dict(o_layer.named_parameters())
    for tname, t in o.tensors.items():
        params[tname].weight_loader(params[tname], t)
    om.process_weights_after_loading(o_layer)
    xs = torch.randn(3, 32)
    want = xs[:, 16:] @ dequantize(o)[:, 16:].t()
    torch.testing.assert_close(om.apply(o_layer, xs[:, 16:]), want, rtol=1e-5, atol=1e-6)


def test_a_missing_tensor_is_named():
    name = "m.down_proj"
    cfg = _config({name: random_layer(8, 32, outlier_frac=0.1, name=name)})
    method = TacqLinearMethod(cfg, name, [name])
    layer = fake_layer(1)
    method.create_weights(layer, 32, [8], 32, 8, torch.float32)
    params = dict(layer.named_parameters())
    params["seg0_q2"].weight_loader(params["seg0_q2"], torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(CheckpointError, match="m.down_proj.*was not loaded"):
        method.process_weights_after_loading(layer)
