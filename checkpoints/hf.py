"""Hugging Face Llama / Mistral / Qwen2 checkpoints: config.json -> ModelConfig, safetensors names -> canonical tree.

Pure mapping, numpy only: reading files and writing orbax live in checkpoints/convert.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from jaxserve.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, has one of the wrong shape, or is unreadable."""


def _rope_fields(hf: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings from either the transformers 5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind in ("default", None):
        return out
    if kind not in ("linear", "llama3"):
        raise CheckpointError(f"config.json: rope type {kind!r} is not supported (default, linear, llama3)")
    out["rope_scaling"] = kind
    out["rope_scaling_factor"] = float(merged["factor"])
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(merged["low_freq_factor"])
        out["rope_high_freq_factor"] = float(merged["high_freq_factor"])
        out["rope_original_max_position"] = int(merged["original_max_position_embeddings"])
    return out


def _sliding_window(hf: Mapping[str, Any], arch: str) -> int:
    """The one window every layer uses (0: none). Qwen2 slides only in layers >= max_window_layers (spelled out as
    `layer_types` by transformers 5); a mix of sliding and full layers is not something our model can express."""
    if arch != "Qwen2ForCausalLM":
        return int(hf.get("sliding_window") or 0)
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if hf.get("use_sliding_window") and i >= int(hf.get("max_window_layers", layers))
        else "full_attention" for i in range(layers)]
    if all(t == "full_attention" for t in types):
        return 0
    if all(t == "sliding_attention" for t in types):
        return int(hf["sliding_window"])
    raise CheckpointError(f"config.json: layer_types {types} mixes sliding-window and full attention layers, "
                          "which is not supported")


def model_config_from_hf(hf: Mapping[str, Any], name: str = "", dtype: str = "float32") -> ModelConfig:
    """Builds our ModelConfig from a Hugging Face config.json dict."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else ""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"config.json: architecture {arch!r} is not one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    bos = hf.get("bos_token_id")
    window = _sliding_window(hf, arch)
    return ModelConfig(
        name=name or hf.get("model_type", "llama"),
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
        attention_bias=bool(hf.get("attention_bias", False)) or arch == "Qwen2ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        bos_token_id=int(bos) if bos is not None else -1,
        eos_token_ids=eos_ids,
        param_dtype=dtype,
        dtype=dtype,
        **_rope_fields(hf),
    )


def canonical_from_hf(get: Callable[[str], np.ndarray], names: set[str], cfg: ModelConfig,
                      on_tensor: Callable[[], None] = lambda: None, dtype: Any = np.float32) -> dict[str, Any]:
    """Assembles the canonical tree from HF tensors, checking every shape.

    get: reads one tensor by its HF name; names: every tensor name present; on_tensor: progress callback;
    dtype: numpy dtype of the floating-point leaves. Tensors are cast one at a time and layers are written into
    preallocated stacks, so peak memory is about one copy of the model in `dtype`.
    """
    d, hd, h, kv, f, v = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
                          cfg.vocab_size)
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        used.add(name)
        if name not in names:
            raise CheckpointError(f"tensor {name!r} is missing (expected shape {shape})")
        a = np.asarray(get(name))
        if a.shape != shape:
            raise CheckpointError(f"tensor {name!r}: expected shape {shape}, found {a.shape}")
        on_tensor()
        return a.astype(dtype) if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a

    def layer(i: int) -> dict[str, Any]:
        p = f"model.layers.{i}."
        attn: dict[str, Any] = {}
        for proj, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            entry = {"kernel": read(p + f"self_attn.{proj}.weight", (heads * hd, d)).T.reshape(d, heads, hd)}
            if cfg.attention_bias:
                entry["bias"] = read(p + f"self_attn.{proj}.bias", (heads * hd,)).reshape(heads, hd)
            attn[proj] = entry
        attn["o_proj"] = {"kernel": read(p + "self_attn.o_proj.weight", (d, h * hd)).T.reshape(h, hd, d)}
        mlp = {
            "gate_proj": {"kernel": read(p + "mlp.gate_proj.weight", (f, d)).T},
            "up_proj": {"kernel": read(p + "mlp.up_proj.weight", (f, d)).T},
            "down_proj": {"kernel": read(p + "mlp.down_proj.weight", (d, f)).T},
        }
        return {
            "attn": attn,
            "mlp": mlp,
            "input_norm": {"scale": read(p + "input_layernorm.weight", (d,))},
            "post_attention_norm": {"scale": read(p + "post_attention_layernorm.weight", (d,))},
        }

    stacked: dict[str, Any] = {}
    for i in range(cfg.num_layers):
        _put_layer(stacked, layer(i), i, cfg.num_layers)
    tree: dict[str, Any] = {
        "embed": {"embedding": read("model.embed_tokens.weight", (v, d))},
        "layers": stacked,
        "final_norm": {"scale": read("model.norm.weight", (d,))},
    }
    if not cfg.tie_embeddings:
        tree["lm_head"] = {"kernel": read("lm_head.weight", (v, d)).T}
    # A tensor nobody reads is a feature this model lacks (an o_proj or MLP bias, ...): refuse rather than serve a
    # silently different model. Rotary tables are recomputed, and a tied head may still be stored.
    unused = sorted(n for n in names - used if not n.endswith("rotary_emb.inv_freq")
                    and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if unused:
        more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
        raise CheckpointError(f"tensors {', '.join(map(repr, unused[:5]))}{more} are not used by this model "
                              "(an unsupported feature?)")
    return tree


def _put_layer(stacked: dict[str, Any], one: dict[str, Any], i: int, num_layers: int) -> None:
    """Writes layer `i`'s tensors into the [num_layers, ...] stacks of `stacked`, allocating them on first use."""
    for k, v in one.items():
        if isinstance(v, dict):
            _put_layer(stacked.setdefault(k, {}), v, i, num_layers)
        else:
            if k not in stacked:
                stacked[k] = np.empty((num_layers, *v.shape), v.dtype)
            stacked[k][i] = v
