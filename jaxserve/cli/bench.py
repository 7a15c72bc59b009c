"""jaxserve-bench: load-test a running jaxserve server and report throughput, latency percentiles and goodput.

    jaxserve-bench --num_requests 200 --request_rate 4 --input_len uniform:64:512 --output_len 128 --ignore_eos
    jaxserve-bench --concurrency 16 --prompts_file prompts.jsonl --slo_ttft_ms 500 --slo_tpot_ms 50
    jaxserve-bench --workload multiturn --turns 4 --system_len 256 --json_out run.json --plot_dir plots/
    jaxserve-bench --target host:50051 --tls --ca_cert ca.pem --token "$TOKEN"

Synthetic prompts are random token ids of the served vocabulary (special ids excluded), seeded by --seed; a prompts
file (a JSON list or JSONL of {"prompt": text or ids, "max_tokens": n}) replaces them. Conversations arrive as a
Poisson process at --request_rate per second (inf: all at once), at most --concurrency in flight (0: no cap).
Failed requests are counted by gRPC status code and never stop the run; the exit status is 1 only when no request
completed.
"""

from __future__ import annotations

import datetime
import math
import os
import sys

import grpc
from absl import app, flags

from jaxserve.bench import plots
from jaxserve.bench.driver import Connection, LoadSpec, run_load
from jaxserve.bench.report import SLO, format_summary, result_json, summarize, write_json
from jaxserve.bench.workload import (
    LengthDistribution,
    PromptsFileError,
    Vocabulary,
    Workload,
    file_workload,
    load_prompts_file,
    multiturn_workload,
    synthetic_workload,
)
from jaxserve.client import Client
from jaxserve.proto import jaxserve_pb2

AUTH_TOKEN_ENV = "JAXSERVE_AUTH_TOKEN"
DEFAULT_NUM_REQUESTS = 100

_TARGET = flags.DEFINE_string("target", "127.0.0.1:50051", "Server address, host:port.")
_TOKEN = flags.DEFINE_string("token", None, f"Bearer token the server expects (default: ${AUTH_TOKEN_ENV}).")
_TLS = flags.DEFINE_bool("tls", False, "Connect with TLS (system roots unless --ca_cert).")
_CA_CERT = flags.DEFINE_string("ca_cert", None, "PEM root certificate to trust (implies --tls).")
_WORKLOAD = flags.DEFINE_enum("workload", "synthetic", ["synthetic", "multiturn"],
                              "synthetic: independent prompts; multiturn: conversations sharing a system prompt, "
                              "each turn's prompt the whole conversation so far plus new user ids.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSON list or JSONL of {\"prompt\": text or token ids, "
                                    "\"max_tokens\": n}; replaces the synthetic prompts.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", None, f"Requests to send (every turn counts); default "
                                     f"{DEFAULT_NUM_REQUESTS}, or the whole --prompts_file.")
_INPUT_LEN = flags.DEFINE_string("input_len", "uniform:32:256", "Prompt length (multiturn: new ids per turn): N, "
                                 "fixed:N, uniform:MIN:MAX or normal:MEAN:STD.")
_OUTPUT_LEN = flags.DEFINE_string("output_len", "uniform:16:128", "max_tokens per request, same forms as "
                                  "--input_len (prompts file entries without max_tokens draw from it too).")
_TURNS = flags.DEFINE_integer("turns", 4, "Turns per conversation (--workload multiturn).")
_SYSTEM_LEN = flags.DEFINE_integer("system_len", 128, "Ids of the shared system prompt (--workload multiturn).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prompts, lengths and arrival times.")
_REQUEST_RATE = flags.DEFINE_float("request_rate", math.inf, "Conversations per second, Poisson arrivals; inf "
                                   "sends everything at t=0.")
_CONCURRENCY = flags.DEFINE_integer("concurrency", 0, "Conversations in flight at most (0: no cap). With an "
                                    "infinite --request_rate this is a closed loop of that many clients.")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Generate exactly max_tokens, past any EOS.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature of every request; 0 is greedy.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", None, "Deadline of each request in seconds (none by default).")
_SLO_TTFT_MS = flags.DEFINE_float("slo_ttft_ms", None, "Goodput target: time to first token, ms.")
_SLO_TPOT_MS = flags.DEFINE_float("slo_tpot_ms", None, "Goodput target: time per output token after the first, ms.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write the full result (meta, summary, every request) here.")
_PLOT_DIR = flags.DEFINE_string("plot_dir", None, "Write latency_cdf.png and throughput.png here (needs "
                                "matplotlib).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


def _connection() -> Connection:
    ca = None
    if _CA_CERT.value:
        with open(_CA_CERT.value, "rb") as f:
            ca = f.read()
    return Connection(_TARGET.value, token=_TOKEN.value or os.environ.get(AUTH_TOKEN_ENV) or None,
                      tls=_TLS.value or ca is not None, root_certificates=ca)


def _model_info(connection: Connection) -> jaxserve_pb2.ModelInfo:
    try:
        with Client(connection.target, token=connection.token, tls=connection.tls,
                    root_certificates=connection.root_certificates) as client:
            return client.model_info(timeout=30)
    except grpc.RpcError as e:
        sys.exit(f"jaxserve-bench: cannot query {connection.target}: "
                 f"{e.code().name}: {e.details()}")  # type: ignore[attr-defined]


def build_workload(info: jaxserve_pb2.ModelInfo) -> Workload:
    """The workload the flags describe, drawing synthetic ids from the served vocabulary."""
    try:
        input_len = LengthDistribution.parse(_INPUT_LEN.value)
        output_len = LengthDistribution.parse(_OUTPUT_LEN.value)
    except ValueError as e:
        raise app.UsageError(f"--input_len/--output_len: {e}") from e
    num_requests = _NUM_REQUESTS.value
    if _PROMPTS_FILE.value:
        if _WORKLOAD.value != "synthetic":
            raise app.UsageError("--prompts_file gives single requests; it cannot be combined with --workload "
                                 f"{_WORKLOAD.value}")
        try:
            entries = load_prompts_file(_PROMPTS_FILE.value)
            return file_workload(entries, num_requests, output_len, _SEED.value, name=_PROMPTS_FILE.value)
        except PromptsFileError as e:
            sys.exit(f"jaxserve-bench: {e}")
    special = tuple(info.eos_token_ids) + ((info.bos_token_id,) if info.bos_token_id >= 0 else ())
    vocab = Vocabulary(info.vocab_size, special)
    n = DEFAULT_NUM_REQUESTS if num_requests is None else num_requests
    try:
        if _WORKLOAD.value == "multiturn":
            return multiturn_workload(n, _TURNS.value, _SYSTEM_LEN.value, input_len, output_len, vocab, _SEED.value)
        return synthetic_workload(n, input_len, output_len, vocab, _SEED.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def _load_spec() -> LoadSpec:
    try:
        return LoadSpec(request_rate=_REQUEST_RATE.value, concurrency=_CONCURRENCY.value,
                        ignore_eos=_IGNORE_EOS.value, temperature=_TEMPERATURE.value, seed=_SEED.value,
                        timeout_s=_TIMEOUT_S.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e


def main(argv: list[str]) -> None:
    """Queries the server, sends the workload, prints the report and writes the JSON and plots asked for."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    spec = _load_spec()
    slo = SLO(_SLO_TTFT_MS.value, _SLO_TPOT_MS.value)
    connection = _connection()
    info = _model_info(connection)
    workload = build_workload(info)
    arrivals = "all at once" if math.isinf(spec.request_rate) else f"Poisson {spec.request_rate:g}/s"
    cap = f", at most {spec.concurrency} in flight" if spec.concurrency else ""
    print(f"jaxserve-bench: {info.model} at {connection.target}; {workload.num_requests} requests of "
          f"{workload.name}; {arrivals}{cap}", flush=True)
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result = run_load(connection, workload, spec, progress=_PROGRESS.value)
    summary = summarize(result.records, result.duration_s, slo)
    print(format_summary(summary, f"jaxserve-bench: {info.model}"))
    if _JSON_OUT.value:
        meta = {"tool": "jaxserve-bench", "started_at": started, "target": connection.target, "model": info.model,
                "workload": workload.name, "num_requests": workload.num_requests,
                "request_rate": str(spec.request_rate), "concurrency": spec.concurrency,
                "ignore_eos": spec.ignore_eos, "temperature": spec.temperature, "seed": _SEED.value,
                "timeout_s": spec.timeout_s}
        write_json(_JSON_OUT.value, result_json(result, summary, meta))
        print(f"wrote {_JSON_OUT.value}")
    if _PLOT_DIR.value:
        try:
            for path in plots.write_plots(result.records, _PLOT_DIR.value, f"({info.model})"):
                print(f"wrote {path}")
        except plots.PlotsUnavailableError as e:
            print(f"jaxserve-bench: no plots written: {e}", file=sys.stderr)
    if summary.completed == 0:
        sys.exit(f"jaxserve-bench: no request completed ({summary.failures})")


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
