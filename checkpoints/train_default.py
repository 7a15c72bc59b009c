"""Trains the shipped default model: a small byte-level Llama on the Python standard library's own sources.

Reproduce the shipped checkpoint (about 30 minutes on 2 shared CPU cores):

    python -m checkpoints.train_default --out checkpoints/default

The architecture is `[model]` of `--config` (configs/default.toml). Everything is seeded by `--seed`: the init,
the order of training windows and the validation windows; the train/validation split is a hash of each file's
path. The corpus is every `*.py` under `sysconfig.get_paths()["stdlib"]` outside site-packages and test
directories, so a different Python version gives a slightly different corpus (the README records the one used).

Training does not go through the paged KV cache: `forward` is a dense causal forward over the canonical parameter
tree built from models/llama.py's own modules (RMSNorm, Projection, MLP, RoPE, LM head); only attention is written
here, densely. After training the script saves the canonical tree with orbax, checks that the serving runner's
logits agree with `forward`, and writes a README with the run's numbers and greedy samples from the runner.
Must not touch: anything outside `--out`.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import platform
import sysconfig
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from checkpoints.orbax_io import load_serving_params, restore_canonical, save_canonical
from jaxserve.config import CheckpointConfig, Config, ModelConfig, load_config
from jaxserve.generate import GenerationOptions, generate
from jaxserve.parallel.mesh import make_mesh
from jaxserve.runner import Runner, StepBatch
from jaxserve.tokenizer import ByteTokenizer
from models import llama

Params = dict[str, Any]

_OUT = flags.DEFINE_string("out", "checkpoints/default", "Output directory (params/ and README.md go there).")
_CONFIG = flags.DEFINE_string("config", "configs/default.toml", "Config whose [model] section is trained.")
_SET = flags.DEFINE_multi_string("set", [], "section.field=value overrides of the config.")
_STEPS = flags.DEFINE_integer("steps", 1600, "Optimizer steps.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per window.")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate.")
_MIN_LR_RATIO = flags.DEFINE_float("min_lr_ratio", 0.1, "Final learning rate as a fraction of the peak.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 100, "Linear warmup steps before the cosine decay.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.1, "AdamW decoupled weight decay (kernels and embeddings).")
_CLIP = flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the init, the batch order and the validation windows.")
_VAL_PERCENT = flags.DEFINE_integer("val_percent", 5, "Percent of files (by path hash) held out for validation.")
_VAL_WINDOWS = flags.DEFINE_integer("val_windows", 64, "Validation windows scored at each evaluation.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 200, "Steps between validation evaluations.")
_DOC_START_FRACTION = flags.DEFINE_float(
    "doc_start_fraction", 0.25, "Fraction of windows that begin at a file's BOS, as served prompts do.")

BOS, EOS = ByteTokenizer.BOS_ID, ByteTokenizer.EOS_ID
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
SAMPLE_PROMPTS = ("def ", "import ", "class Foo", "    for i in range(", "# Copyright")
SAMPLE_TOKENS = 160


# ----- data -----

def stdlib_files() -> list[str]:
    """Paths (relative to the stdlib root, sorted) of the standard library's Python sources, tests excluded."""
    root = sysconfig.get_paths()["stdlib"]
    paths = glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
    rel = (os.path.relpath(p, root) for p in paths)
    return sorted(r for r in rel if not SKIPPED_DIRS.intersection(r.split(os.sep)[:-1]))


def is_validation(rel_path: str, percent: int) -> bool:
    """Deterministic split by a hash of the path, so it does not depend on which other files exist."""
    return zlib.crc32(rel_path.encode()) % 100 < percent


def build_corpus(rel_paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Files as one token stream, each `BOS bytes EOS`; returns (tokens [N] uint16, file start offsets [F])."""
    root = sysconfig.get_paths()["stdlib"]
    parts, starts, offset = [], [], 0
    for rel in rel_paths:
        with open(os.path.join(root, rel), "rb") as f:
            data = np.frombuffer(f.read(), np.uint8).astype(np.uint16)
        doc = np.concatenate([[BOS], data, [EOS]]).astype(np.uint16)
        parts.append(doc)
        starts.append(offset)
        offset += len(doc)
    return np.concatenate(parts), np.asarray(starts, np.int64)


def sample_windows(rng: np.random.RandomState, tokens: np.ndarray, starts: np.ndarray, count: int, length: int,
                   doc_start_fraction: float) -> np.ndarray:
    """`count` windows of `length + 1` tokens (inputs and shifted targets); some begin at a file's BOS."""
    last = len(tokens) - length - 1
    offsets = rng.randint(0, last + 1, size=count)
    at_doc = rng.rand(count) < doc_start_fraction
    offsets = np.where(at_doc, np.minimum(starts[rng.randint(0, len(starts), size=count)], last), offsets)
    return tokens[offsets[:, None] + np.arange(length + 1)[None, :]].astype(np.int32)


# ----- model -----

def dense_attention(p: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Causal GQA over a whole window: paged_attention's math with the window as the sequence. x: [B, T, D]."""
    dtype, pdtype = llama.DTYPE[cfg.dtype], llama.DTYPE[cfg.param_dtype]
    d, hd = cfg.hidden_size, cfg.head_dim

    def proj(name: str, heads: int, axis: str) -> jax.Array:
        module = llama.Projection((d,), (heads, hd), ("embed",), (axis, "head_dim"), cfg.attention_bias, dtype,
                                  pdtype)
        return module.apply({"params": p[name]}, x)

    b, t = x.shape[:2]
    q = llama.apply_rope(proj("q_proj", cfg.num_heads, "heads"), cos, sin)  # [B, T, Hq, hd]
    k = llama.apply_rope(proj("k_proj", cfg.num_kv_heads, "kv_heads"), cos, sin)  # [B, T, Hkv, hd]
    v = proj("v_proj", cfg.num_kv_heads, "kv_heads")
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.num_queries_per_kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    causal = jnp.tril(jnp.ones((t, t), bool))
    if cfg.sliding_window:
        causal &= ~jnp.tril(jnp.ones((t, t), bool), -cfg.sliding_window)
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.num_heads, hd)
    o_proj = llama.Projection((cfg.num_heads, hd), (d,), ("heads", "head_dim"), ("embed",), False, dtype, pdtype)
    return o_proj.apply({"params": p["o_proj"]}, out)


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of windows tokens [B, T] starting at position 0, from the canonical tree."""
    dtype, pdtype = llama.DTYPE[cfg.dtype], llama.DTYPE[cfg.param_dtype]
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = llama.rope_cos_sin(positions, llama.rope_inv_freq(cfg))
    norm = llama.RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
    mlp = llama.MLP(cfg, llama.LocalShapes.of(cfg, 1))
    x = llama.embed_tokens(params["embed"]["embedding"], tokens, dtype, None)
    # Unrolled rather than scanned: XLA:CPU runs the unrolled layers faster, and six layers compile quickly.
    for i in range(cfg.num_layers):
        p = jax.tree.map(lambda a, i=i: a[i], params["layers"])
        x = x + dense_attention(p["attn"], cfg, norm.apply({"params": p["input_norm"]}, x), cos, sin)
        x = x + mlp.apply({"params": p["mlp"]}, norm.apply({"params": p["post_attention_norm"]}, x))
    return llama.lm_logits(params, cfg, x, None)


def loss_fn(params: Params, cfg: ModelConfig, windows: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats over windows [B, T + 1]."""
    logits = forward(params, cfg, windows[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, windows[:, 1:, None], axis=-1))


# ----- optimizer: AdamW with warmup + cosine decay and global-norm clipping -----

BETA1, BETA2, ADAM_EPS = 0.9, 0.95, 1e-8


def learning_rate(step: jax.Array, peak: float, warmup: int, total: int, min_ratio: float) -> jax.Array:
    """Linear warmup to `peak`, then cosine decay to `min_ratio * peak` at `total`."""
    warm = peak * (step + 1) / warmup
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
    return jnp.where(step < warmup, warm, cosine)


def decay_mask(params: Params) -> Params:
    """Weight decay applies to kernels and embeddings, not to norm scales (stacked norms are 2-D, so by name)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", params)


def adamw_init(params: Params) -> Params:
    """Zero first and second moments and a step counter."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    return {"m": zeros, "v": jax.tree.map(jnp.zeros_like, params), "step": jnp.zeros((), jnp.int32)}


def adamw_update(params: Params, grads: Params, state: Params, lr: jax.Array, weight_decay: float, clip: float
                 ) -> tuple[Params, Params, jax.Array]:
    """One clipped AdamW step; returns new params, new state and the pre-clip gradient norm."""
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
    step = state["step"] + 1
    m = jax.tree.map(lambda m, g: BETA1 * m + (1 - BETA1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: BETA2 * v + (1 - BETA2) * g * g, state["v"], grads)
    c1, c2 = 1 - BETA1**step, 1 - BETA2**step

    def update(p: jax.Array, m: jax.Array, v: jax.Array, decay: bool) -> jax.Array:
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + ADAM_EPS) + (weight_decay * p if decay else 0.0))

    new = jax.tree.map(update, params, m, v, decay_mask(params))
    return new, {"m": m, "v": v, "step": step}, norm


# ----- training -----

def train(cfg: ModelConfig, train_data: tuple[np.ndarray, np.ndarray], val_windows: np.ndarray
          ) -> tuple[Params, dict[str, float]]:
    """Runs `--steps` steps; returns the canonical params and the final train/val bits per byte."""
    tokens, starts = train_data
    params = jax.jit(lambda k: llama.init_params(cfg, k))(jax.random.key(_SEED.value))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    logging.info("model %s: %d parameters (%.2f M)", cfg.name, n_params, n_params / 1e6)
    opt = adamw_init(params)
    total = _STEPS.value

    @jax.jit
    def step_fn(params: Params, opt: Params, windows: jax.Array) -> tuple[Params, Params, jax.Array, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, cfg, windows)
        lr = learning_rate(opt["step"], _LR.value, _WARMUP.value, total, _MIN_LR_RATIO.value)
        params, opt, norm = adamw_update(params, grads, opt, lr, _WEIGHT_DECAY.value, _CLIP.value)
        return params, opt, loss, norm

    eval_fn = jax.jit(lambda p, w: loss_fn(p, cfg, w))

    def val_bits() -> float:
        b = _BATCH.value
        losses = [float(eval_fn(params, val_windows[i:i + b])) for i in range(0, len(val_windows), b)]
        return float(np.mean(losses)) / math.log(2)

    rng = np.random.RandomState(_SEED.value)
    recent: list[float] = []
    start = time.time()
    train_bits = val = float("nan")
    for step in range(1, total + 1):
        windows = sample_windows(rng, tokens, starts, _BATCH.value, _SEQ_LEN.value, _DOC_START_FRACTION.value)
        params, opt, loss, norm = step_fn(params, opt, windows)
        recent.append(float(loss))
        if step % _EVAL_EVERY.value == 0 or step == total:
            train_bits = float(np.mean(recent)) / math.log(2)
            val = val_bits()
            elapsed = time.time() - start
            logging.info("step %d/%d  train %.3f bits/byte  val %.3f bits/byte  grad-norm %.2f  %.0f s (%.0f tok/s)",
                         step, total, train_bits, val, float(norm), elapsed,
                         step * _BATCH.value * _SEQ_LEN.value / elapsed)
            recent = []
    return params, {"train_bits": train_bits, "val_bits": val, "seconds": time.time() - start,
                    "params": float(n_params)}


# ----- saving and checking against the serving path -----

def serving_parity(runner: Runner, params: Params, cfg: ModelConfig, sequences: Sequence[np.ndarray]) -> float:
    """Max |logit difference| between the runner's prefill and `forward` over whole sequences."""
    page_size = runner.config.cache.page_size
    worst = 0.0
    for seq in sequences:
        t = len(seq)
        pages = 1 + np.arange(-(-t // page_size), dtype=np.int32)  # page 0 is the trash page
        pos = np.arange(t, dtype=np.int32)
        slots = pages[pos // page_size] * page_size + pos % page_size
        batch = StepBatch(seq[None].astype(np.int32), pos[None], slots[None], pages[None], np.array([t - 1]),
                          np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32),
                          np.zeros(1, np.uint32))
        served = runner.logits(batch)[0]
        trained = np.asarray(jax.jit(lambda p, x: forward(p, cfg, x))(params, seq[None].astype(np.int32)))[0]
        worst = max(worst, float(np.abs(served - trained).max()))
    return worst


def greedy_samples(runner: Runner) -> list[tuple[str, str]]:
    """(prompt, greedy continuation) through the serving runner, BOS first as served prompts are."""
    tok = ByteTokenizer()
    prompts = [tok.encode(p, add_bos=True) for p in SAMPLE_PROMPTS]
    options = [GenerationOptions(max_tokens=SAMPLE_TOKENS, stop_token_ids=tok.eos_ids)] * len(prompts)
    outputs = generate(runner, prompts, options)
    return [(p, tok.decode(o)) for p, o in zip(SAMPLE_PROMPTS, outputs, strict=True)]


def write_readme(out: str, config: Config, stats: dict[str, float], n_train: int, n_val: int, parity: float,
                 samples: list[tuple[str, str]]) -> None:
    """README.md beside the params: what the model is, how to rebuild it, how it did."""
    m = config.model
    flag_names = ("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                  "clip_norm", "seed", "val_percent", "doc_start_fraction")
    flag_text = " ".join(f"--{n}={flags.FLAGS[n].value}" for n in flag_names)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    lines = [
        "# The shipped default model",
        "",
        f"`{m.name}`: a {stats['params'] / 1e6:.2f}M-parameter Llama-style decoder over bytes "
        f"({m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads / {m.num_kv_heads} KV heads of "
        f"{m.head_dim}, SwiGLU {m.intermediate_size}, RoPE theta {m.rope_theta:g}, untied LM head, float32), "
        "trained on the Python standard library's own sources so that the default needs no download and writes "
        "Python-looking text. Tokenizer: `byte` (ids 0-255 bytes, BOS 256, EOS 257; vocab padded to "
        f"{m.vocab_size} so tensor parallelism up to 8 splits it). Config: `configs/default.toml`. "
        "`params/` is the canonical tree (layers stacked) as an orbax checkpoint. Ids 258 and up are padding: "
        "never trained, they keep a small probability, so samplers should mask ids >= 258.",
        "",
        "## How it was trained",
        "",
        "```",
        f"python -m checkpoints.train_default --out checkpoints/default {flag_text}",
        "```",
        "",
        f"- Data: every `*.py` under `sysconfig.get_paths()['stdlib']` outside site-packages and test directories "
        f"(Python {platform.python_version()}), each file `BOS bytes EOS`; {_VAL_PERCENT.value}% of files held out "
        f"by path hash. {n_train / 1e6:.1f}M training bytes, {n_val / 1e6:.2f}M validation bytes.",
        f"- Random windows of {_SEQ_LEN.value} bytes ({_DOC_START_FRACTION.value:.0%} start at a file's BOS), "
        f"batch {_BATCH.value}: {_STEPS.value * _BATCH.value * _SEQ_LEN.value / 1e6:.1f}M tokens seen. "
        f"AdamW (beta {BETA1}/{BETA2}, decoupled decay on kernels and embeddings), linear warmup then cosine "
        "decay, global-norm clipping. Positions beyond the window length were never trained.",
        f"- Wall time: {stats['seconds'] / 60:.1f} min on {os.cpu_count()} CPU cores (JAX {jax.__version__}).",
        f"- Final loss: train {stats['train_bits']:.3f} bits/byte, validation {stats['val_bits']:.3f} bits/byte.",
        f"- Serving runner vs training forward, prefill logits: max |diff| {parity:.2e}.",
        f"- Size on disk: {size / 1e6:.1f} MB.",
        "",
        f"## Greedy samples (serving runner, BOS + prompt, {SAMPLE_TOKENS} bytes or EOS)",
        "",
    ]
    for prompt, text in samples:
        lines += [f"Prompt `{prompt!r}`:", "", "```python", prompt + text, "```", ""]
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def main(argv: Sequence[str]) -> None:
    del argv
    config = load_config(_CONFIG.value, _SET.value)
    cfg = config.model
    files = stdlib_files()
    train_files = [f for f in files if not is_validation(f, _VAL_PERCENT.value)]
    val_files = [f for f in files if is_validation(f, _VAL_PERCENT.value)]
    train_tokens, train_starts = build_corpus(train_files)
    val_tokens, val_starts = build_corpus(val_files)
    logging.info("corpus: %d train files (%d bytes), %d validation files (%d bytes)", len(train_files),
                 len(train_tokens), len(val_files), len(val_tokens))
    val_windows = sample_windows(np.random.RandomState(_SEED.value + 1), val_tokens, val_starts, _VAL_WINDOWS.value,
                                 _SEQ_LEN.value, 0.0)

    params, stats = train(cfg, (train_tokens, train_starts), val_windows)

    params_path = os.path.join(_OUT.value, "params")
    os.makedirs(_OUT.value, exist_ok=True)
    save_canonical(params_path, jax.device_get(params), cfg, overwrite=True)
    # From here on everything reads the checkpoint back the way the server does.
    config = dataclasses.replace(config, checkpoint=CheckpointConfig(path=os.path.abspath(params_path)))
    mesh = make_mesh(config.mesh)
    restored = restore_canonical(params_path, config, mesh)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    runner = Runner(config, load_serving_params(config, mesh), mesh)
    rng = np.random.RandomState(_SEED.value + 2)
    lengths = (37, 200, config.runner.max_chunk)
    sequences = [val_tokens[s:s + t].astype(np.int32)
                 for s, t in zip(val_starts[rng.randint(0, len(val_starts), len(lengths))], lengths, strict=True)]
    parity = serving_parity(runner, restored, cfg, sequences)
    logging.info("serving vs training forward: max |logit diff| %.2e", parity)
    samples = greedy_samples(runner)
    write_readme(_OUT.value, config, stats, len(train_tokens), len(val_tokens), parity, samples)
    print(f"params {int(stats['params'])}  train {stats['train_bits']:.3f} bits/byte  val {stats['val_bits']:.3f} "
          f"bits/byte  {stats['seconds'] / 60:.1f} min  parity {parity:.2e}")
    for prompt, text in samples:
        print(f"--- {prompt!r}\n{prompt}{text}")


if __name__ == "__main__":
    app.run(main)
