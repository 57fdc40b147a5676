"""Hugging Face integration: from_pretrained / save_pretrained round trips, errors, generation."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tacq_kernels
from tacq_kernels import CheckpointError, QuantLinear, replace_linear
from tacq_kernels.hf import quantization_config_for, quantized_layers
from tacq_kernels.testing import random_layer

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

LAYER = "model.layers.1.mlp.down_proj"


def tiny_quantized_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    layers = {}
    for i, (name, mod) in enumerate(n_m for n_m in model.named_modules() if isinstance(n_m[1], torch.nn.Linear)):
        if name == "lm_head":
            continue
        mixed = "mlp" in name
        layers[name] = random_layer(
            mod.out_features, mod.in_features, bits=[2, 4] if mixed else 3, decoder="lut" if mixed else "affine",
            outlier_frac=0.02, perm=mixed, seed=i, name=name,
        )
    replace_linear(model, layers)
    model.config.quantization_config = quantization_config_for(layers, "test")
    return model, layers


@pytest.fixture
def ckpt(tmp_path):
    model, layers = tiny_quantized_llama()
    model.save_pretrained(tmp_path)
    return tmp_path, model, layers


def test_from_pretrained_round_trip(ckpt):
    path, model, layers = ckpt
    loaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # Nothing missing, unexpected or newly initialised.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    qmods = quantized_layers(loaded)
    assert set(qmods) == set(layers)
    for name, layer in layers.items():
        assert qmods[name].spec == layer.spec
        for t, v in layer.tensors.items():
            got = getattr(qmods[name], t)
            assert got.dtype == v.dtype and torch.equal(got, v), (name, t)
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_pretrained_round_trips(ckpt, tmp_path):
    path, model, _ = ckpt
    loaded = AutoModelForCausalLM.from_pretrained(path)
    loaded.save_pretrained(tmp_path / "again")
    first = load_file(str(path / "model.safetensors"))
    second = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert set(first) == set(second)
    for k in first:
        assert first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]), k
    cfg1 = json.loads((path / "config.json").read_text())["quantization_config"]
    cfg2 = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert cfg1 == cfg2


def test_greedy_generation_identical_after_reload(ckpt):
    path, model, _ = ckpt
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 5, 9, 3]])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), loaded.generate(ids, **kw))


def test_bf16_load_keeps_format_dtypes(ckpt):
    path, model, layers = ckpt
    if tacq_kernels.hf.TRANSFORMERS_CASTS_BUFFERS:
        with pytest.raises(ValueError, match="round the fp16 scales through bfloat16"):
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    q = loaded.get_submodule(LAYER)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    for t, v in layers[LAYER].tensors.items():
        assert getattr(q, t).dtype == v.dtype and torch.equal(getattr(q, t), v)
    y = loaded(torch.tensor([[1, 2, 3]])).logits
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def corrupt(path, fn):
    f = str(path / "model.safetensors")
    state = load_file(f)
    fn(state)
    save_file(state, f, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "mutate,match,tensor",
    [
        (lambda s: s[f"{LAYER}.seg0_lut"].view(-1).__setitem__(0, float("nan")), "NaN or Inf", "seg0_lut"),
        (lambda s: s.pop(f"{LAYER}.sparse_val"), "missing tensor", "sparse_val"),
        (lambda s: s[f"{LAYER}.sparse_col"].__setitem__(0, 10_000), "column indices must lie", "sparse_col"),
        (lambda s: s.__setitem__(f"{LAYER}.seg1_q4", s[f"{LAYER}.seg1_q4"][:-1].clone()), "expected shape", "seg1_q4"),
    ],
)
def test_corrupted_checkpoint_names_layer(ckpt, mutate, match, tensor):
    path, _, _ = ckpt
    corrupt(path, mutate)
    with pytest.raises(CheckpointError, match=match) as info:
        AutoModelForCausalLM.from_pretrained(path)
    assert f"layer '{LAYER}'" in str(info.value) and f"tensor '{tensor}'" in str(info.value)


def test_config_that_disagrees_with_weights(ckpt):
    path, _, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["layers"][LAYER]["nnz"] += 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"layer '{LAYER}', tensor 'sparse_col': expected shape"):
        AutoModelForCausalLM.from_pretrained(path)


def test_truncated_checkpoint(ckpt):
    path, _, _ = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    with pytest.raises(Exception, match="truncated|incomplete|corrupt|deserializ"):
        AutoModelForCausalLM.from_pretrained(path)


def test_newer_format_version_refused(ckpt):
    path, _, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="newer than this tacq_kernels reads"):
        AutoModelForCausalLM.from_pretrained(path)


def test_loading_without_import_warns_and_names_the_format(ckpt):
    """Documented behaviour (README): transformers does not know the format without
    `import tacq_kernels`; it warns with the format's name and reports the linear weights as
    missing. This test pins that behaviour so a transformers change is noticed."""
    path, _, _ = ckpt
    code = (
        "import sys; from transformers import AutoModelForCausalLM;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
        "print('LINEAR', type(m.model.layers[0].self_attn.q_proj).__name__)"
    )
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="warning")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=300)
    text = out.stdout + out.stderr
    assert "Unknown quantization type, got tacq_kernels" in text
    assert "q_proj.weight" in text  # reported missing / newly initialised
    assert "LINEAR Linear" in out.stdout


def test_replace_linear_checks_shapes():
    model, layers = tiny_quantized_llama()
    fresh = LlamaForCausalLM(model.config).eval()
    bad = {LAYER: random_layer(64, 81, name=LAYER)}
    with pytest.raises(CheckpointError, match=f"layer '{LAYER}': module is \\[64, 80\\]"):
        replace_linear(fresh, bad)
    with pytest.raises(CheckpointError, match="expected nn.Linear, found LlamaMLP"):
        replace_linear(fresh, {"model.layers.0.mlp": layers[LAYER]})
    with pytest.raises(CheckpointError, match="no such module"):
        replace_linear(fresh, {"model.layers.7.mlp.down_proj": layers[LAYER]})


def test_double_registration_is_harmless():
    assert tacq_kernels.register_with_transformers()
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert "tacq_kernels" in AUTO_QUANTIZER_MAPPING


def test_load_helper(ckpt):
    path, model, _ = ckpt
    m = tacq_kernels.load(path, dtype=torch.float32)
    assert isinstance(m.get_submodule(LAYER), QuantLinear)
