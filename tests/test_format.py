"""Checkpoint format v1: save/load round trip and a clear error for every kind of bad input."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tacq_kernels import CheckpointError, load_layers, make_quantization_config, save_layers
from tacq_kernels.format import LayerSpec, layer_state_dict, parse_quantization_config, read_safetensors
from tacq_kernels.testing import random_layer

NAME = "model.layers.0.mlp.up_proj"


def make_layers():
    return {
        NAME: random_layer(24, 70, bits=3, group_size=32, outlier_frac=0.02, perm=True, bias=True, seed=1, name=NAME),
        "model.layers.0.mlp.down_proj": random_layer(
            70, 24, bits=[2, 4], decoder=["lut", "lut"], outlier_frac=0.01, seed=2, name="model.layers.0.mlp.down_proj"
        ),
    }


@pytest.fixture
def ckpt(tmp_path):
    layers = make_layers()
    path = tmp_path / "model.safetensors"
    extra = {"model.embed_tokens.weight": torch.randn(10, 24)}
    save_layers(path, layers, extra_tensors=extra)
    config = make_quantization_config(layers, method="tacq", method_args={"bits": 3})
    return path, config, layers, extra


def test_save_load_bit_exact(ckpt):
    path, config, layers, extra = ckpt
    config = json.loads(json.dumps(config))  # through JSON, as config.json does
    loaded, rest = load_layers(path, config)
    assert set(loaded) == set(layers)
    for name, layer in layers.items():
        assert loaded[name].spec == layer.spec
        for t, v in layer.tensors.items():
            got = loaded[name].tensors[t]
            assert got.dtype == v.dtype and torch.equal(got, v), (name, t)
    assert torch.equal(rest["model.embed_tokens.weight"], extra["model.embed_tokens.weight"])


def test_sharded_directory_is_read(tmp_path):
    layers = make_layers()
    state = layer_state_dict(layers)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = load_layers(tmp_path, make_quantization_config(layers, "tacq"))
    assert torch.equal(loaded[NAME].tensors["seg0_q2"], layers[NAME].tensors["seg0_q2"])


def rewrite(path, fn):
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def expect_error(path, config, match, tensor=None, layer=NAME):
    with pytest.raises(CheckpointError, match=match) as info:
        load_layers(path, config)
    if layer is not None:
        assert f"layer '{layer}'" in str(info.value)
    if tensor is not None:
        assert f"tensor '{tensor}'" in str(info.value)


def test_truncated_file(ckpt):
    path, config, _, _ = ckpt
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, config, "truncated or corrupt", layer=None)


def test_missing_tensor(ckpt):
    path, config, _, _ = ckpt
    rewrite(path, lambda s: s.pop(f"{NAME}.seg0_scale"))
    expect_error(path, config, "missing tensor", tensor="seg0_scale")


def test_wrong_dtype(ckpt):
    path, config, _, _ = ckpt

    def fn(s):
        s[f"{NAME}.sparse_val"] = s[f"{NAME}.sparse_val"].float()

    rewrite(path, fn)
    expect_error(path, config, "expected dtype torch.float16, got torch.float32", tensor="sparse_val")


def test_shape_disagrees_with_config(ckpt):
    path, config, _, _ = ckpt
    bad = copy.deepcopy(config)
    bad["layers"][NAME]["out_features"] = 25
    expect_error(path, bad, r"expected shape \[6, 25\] from the layer spec, got \[6, 24\]", tensor="seg0_q2")
    bad = copy.deepcopy(config)
    bad["layers"][NAME]["nnz"] += 1
    expect_error(path, bad, "expected shape", tensor="sparse_col")


@pytest.mark.parametrize("bits", [1, 5, 8])
def test_bits_outside_supported(ckpt, bits):
    path, config, _, _ = ckpt
    bad = copy.deepcopy(config)
    bad["layers"][NAME]["segments"][0]["bits"] = bits
    expect_error(path, bad, r"bits must be one of \(2, 3, 4\)")


def test_row_ptr_not_monotone(ckpt):
    path, config, _, _ = ckpt

    def fn(s):
        rp = s[f"{NAME}.sparse_row_ptr"]
        rp[3], rp[4] = rp[4] + 1, rp[3]
        rp[3] = rp[4] + 2

    rewrite(path, fn)
    expect_error(path, config, "not monotone", tensor="sparse_row_ptr")


def test_row_ptr_not_ending_at_nnz(ckpt):
    path, config, _, _ = ckpt

    def fn(s):
        s[f"{NAME}.sparse_row_ptr"][-1] -= 1

    rewrite(path, fn)
    expect_error(path, config, "must end at nnz", tensor="sparse_row_ptr")


def test_column_index_out_of_range(ckpt):
    path, config, _, _ = ckpt

    def fn(s):
        s[f"{NAME}.sparse_col"][0] = 70

    rewrite(path, fn)
    expect_error(path, config, r"column indices must lie in \[0, 70\)", tensor="sparse_col")


@pytest.mark.parametrize(
    "layer,tensor",
    [(NAME, "seg0_scale"), (NAME, "seg0_zero"), ("model.layers.0.mlp.down_proj", "seg1_lut"), (NAME, "sparse_val")],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(ckpt, layer, tensor, value):
    path, config, _, _ = ckpt

    def fn(s):
        s[f"{layer}.{tensor}"].view(-1)[0] = value

    rewrite(path, fn)
    expect_error(path, config, "NaN or Inf", tensor=tensor, layer=layer)


def test_bad_permutation(ckpt):
    path, config, _, _ = ckpt

    def fn(s):
        s[f"{NAME}.perm"][0] = s[f"{NAME}.perm"][1]

    rewrite(path, fn)
    expect_error(path, config, "not a permutation", tensor="perm")


@pytest.mark.parametrize("version,match", [(2, "newer than this tacq_kernels reads"), (0, "unknown format_version"),
                                           ("1", "unknown format_version"), (None, "unknown format_version")])
def test_unknown_format_version(ckpt, version, match):
    path, config, _, _ = ckpt
    bad = dict(config, format_version=version)
    with pytest.raises(CheckpointError, match=match):
        load_layers(path, bad)


def test_wrong_quant_method():
    with pytest.raises(CheckpointError, match="quant_method is 'gptq'"):
        parse_quantization_config({"quant_method": "gptq", "format_version": 1, "layers": {}})


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d["segments"][0].update(end=60), "segments cover 60 columns but in_features is 70"),
        (lambda d: d["segments"][0].update(decoder="nf4"), "decoder must be one of"),
        (lambda d: d.update(in_features=40000, segments=[dict(d["segments"][0], end=40000)]), "int16 column indices"),
        (lambda d: d.pop("nnz"), "missing 'nnz'"),
        (lambda d: d.update(bias="yes"), "'bias' must be true/false"),
    ],
)
def test_bad_layer_spec(mutate, match):
    d = make_layers()[NAME].spec.to_dict()
    mutate(d)
    with pytest.raises(CheckpointError, match=match) as info:
        LayerSpec.from_dict(d, NAME)
    assert NAME in str(info.value)


def test_unexpected_tensor_under_a_layer(ckpt):
    path, config, _, _ = ckpt

    def fn(s):
        s[f"{NAME}.seg1_q2"] = torch.zeros(1, dtype=torch.int32)

    rewrite(path, fn)
    expect_error(path, config, "unexpected tensor", tensor="seg1_q2")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_safetensors(tmp_path)
    with pytest.raises(CheckpointError, match="cannot read safetensors file"):
        read_safetensors(os.path.join(tmp_path, "nope.safetensors"))
