"""`jaxserve-generate`: offline generation from the command line, through the same engine the server runs.

    jaxserve-generate --prompt "def fibonacci(n):" --max_tokens 64
    jaxserve-generate --config configs/llama3-8b.toml --checkpoint /ckpt/llama3-8b/params \
        --prompt "Hi" --temperature 0.7
"""

from __future__ import annotations

import os
import threading
import time

from absl import app, flags

from jaxserve.allocator import reexec_under_tcmalloc
from jaxserve.cli.flags import config_from_flags, define_config_flags
from jaxserve.engine import Engine, Request, RequestOutput
from jaxserve.replica import DEFAULT_CONFIG, build_replica
from jaxserve.sequence import SamplingOptions

define_config_flags()
FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (overrides checkpoint.path of the config).")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for several, generated as one batch.")
flags.DEFINE_integer("max_tokens", 64, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same seed and prompt give the same output).")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past the end-of-sequence token.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.prompt:
        raise app.UsageError("give at least one --prompt")
    if FLAGS.config is None and os.path.exists(DEFAULT_CONFIG):
        FLAGS.config = DEFAULT_CONFIG
    overrides = [f"checkpoint.path={FLAGS.checkpoint}"] if FLAGS.checkpoint else []
    FLAGS.set = [*FLAGS.set, *overrides, "runner.warmup=false"]
    config = config_from_flags()
    try:
        options = SamplingOptions(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                                  seed=FLAGS.seed, max_tokens=FLAGS.max_tokens, stop=tuple(FLAGS.stop),
                                  ignore_eos=FLAGS.ignore_eos)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    replica = build_replica(config)
    engine = Engine(config, replica.runner, replica.tokenizer)
    engine.start()
    texts = {i: [] for i in range(len(FLAGS.prompt))}
    counts = dict.fromkeys(texts, 0)
    finals: dict[int, RequestOutput] = {}
    done = threading.Condition()

    def sink_for(i: int):
        def sink(out: RequestOutput) -> None:
            with done:
                texts[i].append(out.text)
                counts[i] += len(out.token_ids)
                if out.finish_reason is not None:
                    finals[i] = out
                    done.notify_all()
        return sink

    start = time.perf_counter()
    for i, prompt in enumerate(FLAGS.prompt):
        ids = replica.tokenizer.encode(prompt, add_bos=replica.tokenizer.bos_id is not None)
        engine.submit(Request(str(i), ids, options), sink_for(i))
    with done:
        done.wait_for(lambda: len(finals) == len(texts))
    seconds = time.perf_counter() - start
    engine.shutdown(timeout=5)
    for i, prompt in enumerate(FLAGS.prompt):
        print(f"--- prompt {i} ({finals[i].finish_reason}{': ' + finals[i].error if finals[i].error else ''})")
        print(prompt + "".join(texts[i]))
    total = sum(counts.values())
    print(f"--- {total} tokens in {seconds:.2f} s: {total / seconds:.1f} tokens/s "
          f"(including compilation; {replica.runner.compile_count} compilations)")


def run() -> None:
    """Console-script entry point (under tcmalloc when installed: see jaxserve.allocator)."""
    reexec_under_tcmalloc()
    app.run(main)


if __name__ == "__main__":
    run()
