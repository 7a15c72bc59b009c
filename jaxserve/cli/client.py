"""jaxserve-client: stream a completion from a jaxserve server and print the text as it arrives.

    jaxserve-client --prompt "def fibonacci(n):" --max_tokens 128 --temperature 0.8 --seed 1
    jaxserve-client --target host:50051 --tls --ca_cert ca.pem --auth_token_file token.txt --prompt "import "
    jaxserve-client --info                                # the served model and its limits

The finish reason and token counts go to stderr, so stdout holds only the generated text.
"""

from __future__ import annotations

import os
import sys

import grpc
from absl import app, flags

from jaxserve.client import Client

AUTH_TOKEN_ENV = "JAXSERVE_AUTH_TOKEN"

_TARGET = flags.DEFINE_string("target", "127.0.0.1:50051", "Server address, host:port.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text (or give it as positional arguments).")
_TOKEN_IDS = flags.DEFINE_list("token_ids", None, "Prompt as comma-separated token ids instead of text.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass in (0, 1].")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed in [0, 2**32).")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Keep generating past the model's EOS.")
_TLS = flags.DEFINE_bool("tls", False, "Connect with TLS (system roots unless --ca_cert).")
_CA_CERT = flags.DEFINE_string("ca_cert", None, "PEM root certificate to trust (implies --tls).")
_SERVER_NAME = flags.DEFINE_string("server_name", None, "Name to check the server certificate against.")
_AUTH_TOKEN_FILE = flags.DEFINE_string("auth_token_file", None,
                                       f"File holding the bearer token (or ${AUTH_TOKEN_ENV}).")
_TIMEOUT = flags.DEFINE_float("timeout", None, "Deadline of the request in seconds.")
_INFO = flags.DEFINE_bool("info", False, "Print the served model's info and exit.")


def _token() -> str | None:
    if _AUTH_TOKEN_FILE.value:
        with open(_AUTH_TOKEN_FILE.value, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get(AUTH_TOKEN_ENV) or None


def main(argv: list[str]) -> None:
    """Streams one completion to stdout (or prints model info)."""
    ca = None
    if _CA_CERT.value:
        with open(_CA_CERT.value, "rb") as f:
            ca = f.read()
    client = Client(_TARGET.value, token=_token(), tls=_TLS.value, root_certificates=ca,
                    server_name=_SERVER_NAME.value)
    try:
        if _INFO.value:
            print(client.model_info(timeout=_TIMEOUT.value), end="")
            return
        if _TOKEN_IDS.value:
            prompt: str | list[int] = [int(t) for t in _TOKEN_IDS.value]
        elif _PROMPT.value is not None or len(argv) > 1:
            prompt = _PROMPT.value if _PROMPT.value is not None else " ".join(argv[1:])
        else:
            raise app.UsageError("give a prompt: --prompt TEXT, positional words, or --token_ids")
        last = None
        for delta in client.generate(prompt, timeout=_TIMEOUT.value, max_tokens=_MAX_TOKENS.value,
                                     temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                     seed=_SEED.value, stop=_STOP.value, ignore_eos=_IGNORE_EOS.value):
            print(delta.text, end="", flush=True)
            last = delta
        print()
        if last is not None and last.usage is not None:
            u = last.usage
            print(f"[{last.finish_reason}: {u.prompt_tokens} prompt ({u.cached_tokens} cached: {u.cached_device} "
                  f"device, {u.cached_host} host, {u.cached_disk} disk) + {u.completion_tokens} generated tokens]",
                  file=sys.stderr)
    except grpc.RpcError as e:
        sys.exit(f"jaxserve-client: {e.code().name}: {e.details()}")  # type: ignore[attr-defined]
    finally:
        client.close()


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
