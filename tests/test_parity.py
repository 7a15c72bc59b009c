"""Logits parity with Hugging Face transformers through the real path: save_pretrained -> our converter -> orbax ->
load_serving_params -> Runner prefill and decode, for Llama (llama3 RoPE, untied), Mistral (sliding window) and
Qwen2 (tied, q/k/v bias, one KV head), on one device and on a tensor=2 x pipeline=2 mesh."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints.convert import convert, read_hf_config  # noqa: E402
from checkpoints.orbax_io import load_serving_params  # noqa: E402
from jaxserve.config import CacheConfig, CheckpointConfig, Config, MeshConfig, RunnerConfig  # noqa: E402
from jaxserve.parallel.mesh import make_mesh  # noqa: E402
from jaxserve.runner import Runner, StepBatch  # noqa: E402

PROMPT_LEN = 20
DECODE_STEPS = 32
PAGE_SIZE = 8
# Scattered pages (page 0 is the reserved trash page) so a wrong page lookup cannot pass by accident.
BLOCK_TABLE = np.array([[9, 3, 14, 1, 7, 12, 5, 10]], np.int32)  # [1, max_pages_per_seq]
TOLERANCE = 1e-4

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # A window shorter than prompt + continuation, so decode reads past its edge.
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=16)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, num_key_value_heads=1)),
}


@dataclasses.dataclass(frozen=True)
class Reference:
    """A converted checkpoint and what transformers computes on one prompt."""

    checkpoint: str
    hf_dir: str
    prompt: np.ndarray  # [1, PROMPT_LEN]
    prefill_logits: np.ndarray  # [PROMPT_LEN, V]
    continuation: np.ndarray  # [DECODE_STEPS + 1] greedy tokens from generate()
    decode_logits: np.ndarray  # [DECODE_STEPS, V] logits at positions PROMPT_LEN .. PROMPT_LEN + DECODE_STEPS - 1


@functools.cache
def _reference(arch: str, root: str) -> Reference:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**COMMON, **extra}, attn_implementation="eager")).eval()
    with torch.no_grad():
        # Random biases and norm scales, so that a dropped or misplaced one changes the logits.
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
            if "norm" in name:
                p.normal_(1, 0.1)
    hf_dir, checkpoint = f"{root}/{arch}-hf", f"{root}/{arch}-orbax"
    model.save_pretrained(hf_dir)
    convert(hf_dir, checkpoint, dtype="float32")

    prompt = np.random.RandomState(1).randint(0, COMMON["vocab_size"], (1, PROMPT_LEN)).astype(np.int32)
    ids = torch.tensor(prompt, dtype=torch.long)
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=DECODE_STEPS + 1)
        logits = model(generated[:, :-1]).logits[0].numpy()  # [PROMPT_LEN + DECODE_STEPS, V]
    return Reference(checkpoint, hf_dir, prompt, logits[:PROMPT_LEN], generated[0, PROMPT_LEN:].numpy(),
                     logits[PROMPT_LEN:])


def _row(tokens: np.ndarray, positions: np.ndarray) -> StepBatch:
    """One greedy row: tokens and positions [1, T], slots looked up through BLOCK_TABLE."""
    slots = BLOCK_TABLE[0][positions // PAGE_SIZE] * PAGE_SIZE + positions % PAGE_SIZE
    return StepBatch(tokens.astype(np.int32), positions.astype(np.int32), slots.astype(np.int32), BLOCK_TABLE,
                     np.array([tokens.shape[1] - 1], np.int32), np.zeros(1, np.float32), np.zeros(1, np.int32),
                     np.ones(1, np.float32), np.zeros(1, np.uint32))


@pytest.mark.parametrize("arch,tensor,pipeline", [
    ("llama", 1, 1), ("mistral", 1, 1), ("qwen2", 1, 1), ("qwen2", 2, 2)])
def test_prefill_and_greedy_decode_match_transformers(arch, tensor, pipeline, tmp_path_factory):
    ref = _reference(arch, str(tmp_path_factory.getbasetemp()))
    config = Config(
        model=read_hf_config(ref.hf_dir),
        mesh=MeshConfig(tensor=tensor, pipeline=pipeline),
        cache=CacheConfig(page_size=PAGE_SIZE, num_pages=16),
        runner=RunnerConfig(max_seq_len=BLOCK_TABLE.shape[1] * PAGE_SIZE, batch_buckets=(1,),
                            prefill_buckets=(32,), warmup=False),
        checkpoint=CheckpointConfig(path=ref.checkpoint),
    )
    mesh = make_mesh(config.mesh)
    runner = Runner(config, load_serving_params(config, mesh), mesh)

    prefill = runner.logits(_row(ref.prompt, np.arange(PROMPT_LEN)[None]))[0]  # [PROMPT_LEN, V]
    assert np.abs(prefill - ref.prefill_logits).max() <= TOLERANCE

    tokens = [int(prefill[-1].argmax())]
    worst = 0.0
    for step in range(DECODE_STEPS):
        pos = PROMPT_LEN + step
        logits = runner.logits(_row(np.array([[tokens[-1]]]), np.array([[pos]])), decode=True)[0, 0]  # [V]
        if tokens == list(ref.continuation[: step + 1]):  # same sequence so far: the logits must agree
            worst = max(worst, float(np.abs(logits - ref.decode_logits[step]).max()))
        tokens.append(int(logits.argmax()))
    assert tokens == ref.continuation.tolist(), f"greedy continuation diverged (decode logits max diff {worst:.2e})"
    assert worst <= TOLERANCE
    assert runner.compile_count == 2  # one prefill and one decode bucket: nothing recompiled per step
