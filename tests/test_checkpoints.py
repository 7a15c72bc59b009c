"""checkpoints/ (convert, orbax_io, hf), jaxserve/cli/convert.py and jaxserve/cli/flags.py: round trips across
meshes, and every way a checkpoint can be wrong failing with a CheckpointError that names the tensor."""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from absl import app, flags
from safetensors.numpy import save_file

from checkpoints.convert import convert, load_hf_canonical, read_hf_config
from checkpoints.hf import CheckpointError
from checkpoints.orbax_io import MODEL_JSON, load_serving_params, restore_canonical, save_canonical
from jaxserve.cli import flags as config_flags
from jaxserve.config import CheckpointConfig, Config, MeshConfig, ModelConfig, load_config
from jaxserve.parallel import layout
from jaxserve.parallel.mesh import make_mesh
from models import llama

REPO = pathlib.Path(__file__).resolve().parent.parent
# Two layers (so a layer mix-up shows), biases (so they round-trip), four heads over two KV heads.
MODEL = ModelConfig(name="ckpt-test", vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=16, attention_bias=True, max_position=512)
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
    "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def _random_canonical(model: ModelConfig, seed: int = 0) -> dict:
    """Host numpy params of `model`'s canonical tree, all distinct values."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), llama.abstract_params(model))


def _config(model: ModelConfig, path: str = "", tensor: int = 1, pipeline: int = 1) -> Config:
    return Config(model=model, mesh=MeshConfig(tensor=tensor, pipeline=pipeline), checkpoint=CheckpointConfig(path))


def _saved(tmp_path: pathlib.Path, model: ModelConfig = MODEL) -> tuple[str, dict]:
    path = str(tmp_path / "ckpt")
    canonical = _random_canonical(model)
    save_canonical(path, canonical, model)
    return path, canonical


def _hf_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Hugging Face Llama tensors (PyTorch [out, in] layout) for HF_CONFIG."""
    d, f, v, hd = 64, 160, 256, 16
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (4 * hd, d), p + "self_attn.k_proj.weight": (2 * hd, d),
                   p + "self_attn.v_proj.weight": (2 * hd, d), p + "self_attn.o_proj.weight": (d, 4 * hd),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _hf_dir(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> str:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file(tensors, str(path / "model.safetensors"))
    return str(path)


# ----- orbax round trip -----

def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    source = _config(MODEL, tensor=2)
    canonical = _random_canonical(MODEL)
    sharded = jax.device_put(canonical, layout.shardings(make_mesh(source.mesh), layout.canonical_specs(source)))
    path = str(tmp_path / "ckpt")
    save_canonical(path, sharded, MODEL)

    # tensor=4 > num_kv_heads=2: the serving layout also repeats KV heads.
    target = _config(MODEL, path, tensor=4, pipeline=2)
    mesh = make_mesh(target.mesh)
    restored = restore_canonical(path, target, mesh)
    want_shardings = jax.tree.leaves(layout.shardings(mesh, layout.canonical_specs(target)))
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(canonical), want_shardings, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding == sharding  # restored straight into its shards, not gathered then split

    serving = load_serving_params(target, mesh)
    expected = layout.to_serving(canonical, target)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), serving, expected)


# ----- a checkpoint that does not fit the config -----

def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    path, _ = _saved(tmp_path)
    narrower = dataclasses.replace(MODEL, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"layers/mlp/down_proj/kernel: expected shape \(2, 128, 64\), "
                                              r"found \(2, 160, 64\)"):
        restore_canonical(path, _config(narrower, path), make_mesh(MeshConfig()))


def test_missing_tensor_is_named(tmp_path):
    tied = dataclasses.replace(MODEL, tie_embeddings=True)
    path, _ = _saved(tmp_path, tied)
    with pytest.raises(CheckpointError, match=r"tensor lm_head/kernel is missing \(expected shape \(64, 256\)\)"):
        restore_canonical(path, _config(MODEL, path), make_mesh(MeshConfig()))


def test_same_shapes_but_different_architecture_field_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    other = dataclasses.replace(MODEL, rope_theta=500000.0)
    with pytest.raises(CheckpointError, match=r"model.rope_theta: config has 500000.0, checkpoint has 10000.0"):
        restore_canonical(path, _config(other, path), make_mesh(MeshConfig()))


def _garbage_data(path: str) -> None:
    for f in glob.glob(f"{path}/**/d/*", recursive=True):
        pathlib.Path(f).write_bytes(os.urandom(os.path.getsize(f)))


def _truncate_largest_data_file(path: str) -> None:
    largest = max(glob.glob(f"{path}/**/d/*", recursive=True), key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


@pytest.mark.parametrize("damage,message", [
    (_garbage_data, r"metadata is unreadable \(tensor [\w/]+: ValueError: DATA_LOSS"),
    # Which tensors share the truncated data file depends on orbax's write order, so any tensor may be named.
    (_truncate_largest_data_file, r"reading the weights failed \(tensor [\w/]+: ValueError: OUT_OF_RANGE"),
    (lambda p: os.remove(f"{p}/_METADATA"), "metadata is unreadable"),
    (lambda p: os.remove(f"{p}/{MODEL_JSON}"), f"{MODEL_JSON} is missing"),
    (lambda p: shutil.rmtree(p), "does not exist"),
], ids=["garbage-data", "truncated-data", "no-orbax-metadata", "no-model-json", "no-directory"])
# Orbax reads every tensor's metadata concurrently; when one fails, the others' failed futures are never awaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoint_raises_checkpoint_error(tmp_path, damage, message):
    path, _ = _saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as e:
        restore_canonical(path, _config(MODEL, path), make_mesh(MeshConfig()))
    assert path in str(e.value)
    gc.collect()  # let those futures go while the warning filter above still applies


# ----- Hugging Face safetensors -----

def test_missing_safetensors_tensor_is_named(tmp_path):
    tensors = _hf_tensors(np.random.default_rng(0))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    hf_dir = _hf_dir(tmp_path / "hf", tensors)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing \(expected shape "
                                              r"\(160, 64\)\)"):
        convert(hf_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_safetensors_shape_mismatch_and_unused_tensor_are_named(tmp_path):
    tensors = _hf_tensors(np.random.default_rng(0))
    tensors["model.norm.weight"] = np.ones(32, np.float32)
    cfg = read_hf_config(_hf_dir(tmp_path / "a", tensors))
    with pytest.raises(CheckpointError, match=r"'model.norm.weight': expected shape \(64,\), found \(32,\)"):
        load_hf_canonical(str(tmp_path / "a"), cfg)

    tensors = _hf_tensors(np.random.default_rng(0))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)  # a feature the model lacks
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.o_proj.bias'.* not used"):
        load_hf_canonical(_hf_dir(tmp_path / "b", tensors), cfg)


def test_truncated_safetensors_file_is_refused(tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf", _hf_tensors(np.random.default_rng(0)))
    shard = os.path.join(hf_dir, "model.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf_canonical(hf_dir, read_hf_config(hf_dir))


# ----- the convert CLI -----

def test_convert_cli_converts_sharded_bfloat16_checkpoint_end_to_end(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save_file

    tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in _hf_tensors(np.random.default_rng(0)).items()}
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(HF_CONFIG))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        torch_save_file({n: tensors[n] for n in members}, str(hf_dir / file))
    weight_map = {n: file for file, members in shards.items() for n in members}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (hf_dir / "tokenizer.json").write_text("{}")
    (hf_dir / "tokenizer_config.json").write_text("{}")

    out, config_out = tmp_path / "orbax", tmp_path / "configs" / "model.toml"
    result = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli.convert", f"--hf_dir={hf_dir}", f"--out={out}", "--dtype=bfloat16",
         f"--config_out={config_out}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "converted 21 tensors" in result.stdout and "params" in result.stdout and " s -> " in result.stdout
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()

    config = load_config(str(config_out))  # the written TOML serves the checkpoint
    assert config.checkpoint.path == str(out) and config.tokenizer.path == str(out / "tokenizer.json")
    assert config.model.param_dtype == "bfloat16" and config.model.eos_token_ids == (2,)
    restored = restore_canonical(config.checkpoint.path, config, make_mesh(MeshConfig()))
    assert restored["embed"]["embedding"].dtype == ml_dtypes.bfloat16
    # bfloat16 in, bfloat16 out: bit-exact, and in the canonical [in, out] layout.
    down = tensors["model.layers.1.mlp.down_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(restored["layers"]["mlp"]["down_proj"]["kernel"][1], np.float32), down.T)
    q = tensors["model.layers.0.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(np.asarray(restored["layers"]["attn"]["q_proj"]["kernel"][0], np.float32),
                                  q.T.reshape(64, 4, 16))


def test_convert_cli_reports_a_bad_input_without_traceback(tmp_path):
    from jaxserve.cli import convert as convert_cli

    flags.FLAGS(["jaxserve-convert", f"--hf_dir={tmp_path}", f"--out={tmp_path / 'out'}"])
    try:
        with pytest.raises(SystemExit, match="has no config.json"):
            convert_cli.main(["jaxserve-convert"])
    finally:
        flags.FLAGS.unparse_flags()


# ----- shared CLI config flags -----

def test_config_flags_apply_overrides_to_the_file():
    fv = flags.FlagValues()
    config_flags.define_config_flags(fv)
    config_flags.define_config_flags(fv)  # a second CLI in the same process
    fv(["prog", f"--config={REPO / 'configs' / 'tiny.toml'}", "--set", "mesh.tensor=2", "--set=model.dtype=float32"])
    config = config_flags.config_from_flags(fv)
    assert config.mesh.tensor == 2 and config.model.vocab_size == 264


def test_config_flags_unknown_field_is_a_usage_error_naming_it():
    fv = flags.FlagValues()
    config_flags.define_config_flags(fv)
    fv(["prog", "--set", "model.num_layer=4"])
    with pytest.raises(app.UsageError, match=r"model.num_layer: unknown field"):
        config_flags.config_from_flags(fv)


def test_qwen2_gets_a_sliding_window_only_when_every_layer_slides():
    from checkpoints.hf import model_config_from_hf

    qwen2 = {**HF_CONFIG, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16, "use_sliding_window": True}
    assert model_config_from_hf({**qwen2, "max_window_layers": 0}).sliding_window == 16
    assert model_config_from_hf({**qwen2, "max_window_layers": 28}).sliding_window == 0  # no layer reaches 28
    assert model_config_from_hf({**qwen2, "use_sliding_window": False}).sliding_window == 0
    with pytest.raises(CheckpointError, match="mixes sliding-window and full attention layers"):
        model_config_from_hf({**qwen2, "max_window_layers": 1})
