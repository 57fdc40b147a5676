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


def _edit_layers(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))


def _rename_layers(qc):
    qc["layers"] = {n.replace("model.layers.", "model.blocks."): v for n, v in qc["layers"].items()}


def _drop_one_layer(qc):
    del qc["layers"][LAYER]


# Each of these used to load "fine" with some or all linears randomly initialised (issue 17).
LAYERS_TABLE_HOLES = [
    ("missing", lambda qc: qc.pop("layers"), "has no 'layers' table", None),
    ("null", lambda qc: qc.__setitem__("layers", None), "has no 'layers' table", None),
    ("empty", lambda qc: qc.__setitem__("layers", {}), "'layers' table is empty", None),
    ("not-an-object", lambda qc: qc.__setitem__("layers", []), "must be a JSON object", None),
    ("names-no-module", _rename_layers, "no such module in the model", "model.blocks."),
    ("one-layer-missing", _drop_one_layer, "does not list it", LAYER),
]


@pytest.mark.parametrize("case,edit,match,layer", LAYERS_TABLE_HOLES, ids=[c[0] for c in LAYERS_TABLE_HOLES])
def test_layers_table_must_match_the_checkpoint(ckpt, case, edit, match, layer):
    path, _, _ = ckpt
    _edit_layers(path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        AutoModelForCausalLM.from_pretrained(path)
    if layer:
        assert f"layer '{layer}" in str(info.value)
    # the format's own reader and `tacq inspect` refuse it as well (they share the parser), except a table that
    # merely names other modules: that needs the model, which only from_pretrained builds
    if case not in ("names-no-module", "one-layer-missing"):
        with pytest.raises(CheckpointError, match=match):
            tacq_kernels.load_layers(path, json.loads((path / "config.json").read_text())["quantization_config"])


def test_linear_without_weight_or_spec_is_refused(ckpt):
    """A plain linear whose weight the checkpoint lacks would be randomly initialised: refused, named."""
    path, _, _ = ckpt
    corrupt(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="layer 'lm_head'.*randomly initialised"):
        AutoModelForCausalLM.from_pretrained(path)


# --- loading in a fresh interpreter that never imports tacq_kernels (tacq_kernels_autoload.pth) ---

def run_fresh_python(code, *args, cwd, env=None, pythonpath=None):
    """``code`` in a new interpreter of this environment, started in ``cwd`` (outside the
    repository, whose ``tacq_kernels/`` would otherwise be importable from the current directory);
    ``code`` must not import tacq_kernels."""
    assert "import tacq_kernels" not in code and "tacq_kernels." not in code
    full_env = {k: v for k, v in os.environ.items() if k != "TACQ_KERNELS_AUTOLOAD"}
    full_env.update(env or {})
    if pythonpath:  # in front of the caller's PYTHONPATH (make test's transformers 4.57 run sets one)
        full_env["PYTHONPATH"] = os.pathsep.join([pythonpath] + [p for p in [full_env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


HEAVY = ("torch", "transformers", "triton", "tacq_kernels")


def test_fresh_python_loads_checkpoint_without_import(ckpt, tmp_path):
    """With the package installed, a process that never imports tacq_kernels gets the quantized
    model (the same logits as with the import); start-up and `import torch` import nothing of
    transformers, Triton or tacq_kernels."""
    path, model, _ = ckpt
    ids = torch.randint(0, 96, (2, 9))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = lambda: sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "print('AT_START', loaded(), repr(sys.meta_path[0]))\n"
        "import torch\n"
        "print('AFTER_TORCH', loaded())\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print('OUTCOME', sys.modules['tacq_kernels_autoload'].outcome, type(m.model.layers[0].self_attn.q_proj).__name__)\n"
        "print('FINDER_LEFT', any('tacq_kernels_autoload' in repr(f) for f in sys.meta_path))\n"
        "torch.save(m(torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    out = run_fresh_python(code, path, tmp_path / "ids.pt", tmp_path / "logits.pt", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AT_START [] <tacq_kernels_autoload finder for transformers.quantizers>" in out.stdout, out.stdout
    assert "AFTER_TORCH ['torch']" in out.stdout, out.stdout
    assert "OUTCOME registered QuantLinear" in out.stdout and "FINDER_LEFT False" in out.stdout, out.stdout
    assert "Unknown quantization type" not in out.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), model(ids).logits)


def test_hook_disabled_refuses_to_load(ckpt, tmp_path):
    """Documented off switch: TACQ_KERNELS_AUTOLOAD=0 imports nothing, and loading a checkpoint
    without `import tacq_kernels` raises instead of returning random weights; the import then fixes it."""
    path, _, _ = ckpt
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        "    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "except RuntimeError as e:\n"
        "    print('REFUSED', e)\n"
        "print('IMPORTED', 'tacq_kernels' in sys.modules)\n"
        "__import__('tacq_kernels')\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print('AFTER_IMPORT', type(m.model.layers[0].self_attn.q_proj).__name__)\n"
    )
    out = run_fresh_python(code, path, cwd=tmp_path, env={"TACQ_KERNELS_AUTOLOAD": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED this is a tacq_kernels checkpoint" in out.stdout, out.stdout
    assert "automatic registration is off (TACQ_KERNELS_AUTOLOAD=0)" in out.stdout
    assert "IMPORTED False" in out.stdout and "AFTER_IMPORT QuantLinear" in out.stdout, out.stdout


def test_hook_failure_is_reported_once_and_refuses(ckpt, tmp_path):
    """A tacq_kernels that cannot be imported: interpreter start-up, `import torch` and transformers
    still work, the error is reported once on stderr, and the checkpoint refuses to load."""
    path, _, _ = ckpt
    broken = tmp_path / "broken" / "tacq_kernels"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated broken install')\n")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "LlamaConfig()\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "    except RuntimeError as e:\n"
        "        print('REFUSED', e)\n"
    )
    out = run_fresh_python(code, path, cwd=tmp_path, pythonpath=str(broken.parent))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("tacq_kernels_autoload: could not register tacq_kernels") == 1, out.stderr
    assert "simulated broken install" in out.stderr
    assert out.stdout.count("REFUSED this is a tacq_kernels checkpoint") == 2, out.stdout
    assert "importing tacq_kernels failed (ImportError: simulated broken install)" in out.stdout


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
