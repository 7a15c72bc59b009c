"""Offline batch generation straight on the runner: the path behind `jaxserve-generate` and the model-core tests.

Every prompt gets its own contiguous run of pages; prompts are prefilled chunk by chunk, then all rows decode
together until each stops. Sampled ids come back once per step and stop conditions are checked on the host.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxserve.runner import Runner, StepBatch


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Sampling knobs of one offline request (temperature 0 is greedy)."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()


def _slots(pages: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    return (pages[positions // page_size] * page_size + positions % page_size).astype(np.int32)


def generate(runner: Runner, prompts: Sequence[Sequence[int]], options: Sequence[GenerationOptions]
             ) -> list[list[int]]:
    """Generates for each prompt; returns the new token ids (a stop token, when hit, is included)."""
    cfg = runner.config
    page_size = cfg.cache.page_size
    if len(prompts) > cfg.runner.max_batch:
        raise ValueError(f"{len(prompts)} prompts exceed runner.max_batch={cfg.runner.max_batch}")
    lengths = [len(p) + o.max_tokens for p, o in zip(prompts, options, strict=True)]
    for p, n in zip(prompts, lengths, strict=True):
        if not p:
            raise ValueError("a prompt must hold at least one token")
        if n > cfg.runner.max_seq_len:
            raise ValueError(f"prompt + max_tokens = {n} exceeds runner.max_seq_len={cfg.runner.max_seq_len}")
    tables, next_page = [], 1
    for n in lengths:
        count = -(-n // page_size)
        tables.append(np.arange(next_page, next_page + count, dtype=np.int32))
        next_page += count
    if next_page > cfg.cache.num_pages:
        raise ValueError(f"{next_page - 1} pages needed, the pool has {cfg.cache.num_pages - 1}")

    def knobs(rows: Sequence[int]) -> tuple[np.ndarray, ...]:
        o = [options[i] for i in rows]
        return (np.array([x.temperature for x in o], np.float32), np.array([x.top_k for x in o], np.int32),
                np.array([x.top_p for x in o], np.float32), np.array([x.seed for x in o], np.uint32))

    outputs: list[list[int]] = [[] for _ in prompts]
    chunk = cfg.runner.max_chunk
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int32)
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            pos = np.arange(start, start + len(part), dtype=np.int32)
            batch = StepBatch(part[None], pos[None], _slots(tables[i], pos, page_size)[None], tables[i][None],
                              np.array([len(part) - 1], np.int32), *knobs([i]))
            sampled = runner.prefill(batch)
        outputs[i].append(int(np.asarray(sampled.token)[0]))

    def finished(i: int) -> bool:
        out = outputs[i]
        return len(out) >= options[i].max_tokens or out[-1] in options[i].stop_token_ids

    live = [i for i in range(len(prompts)) if not finished(i)]
    while live:
        pos = np.array([len(prompts[i]) + len(outputs[i]) - 1 for i in live], np.int32)
        width = int(pos.max()) // page_size + 1  # only the pages in use, so attention reads no more
        table = np.zeros((len(live), width), np.int32)
        for r, i in enumerate(live):
            used = tables[i][:width]
            table[r, : len(used)] = used
        slots = np.array([_slots(tables[i], pos[r: r + 1], page_size)[0] for r, i in enumerate(live)], np.int32)
        batch = StepBatch(np.array([[outputs[i][-1]] for i in live], np.int32), pos[:, None], slots[:, None],
                          table, np.zeros(len(live), np.int32), *knobs(live))
        tokens = np.asarray(runner.decode(batch).token)
        for r, i in enumerate(live):
            outputs[i].append(int(tokens[r]))
        live = [i for i in live if not finished(i)]
    return outputs
