"""jaxserve-convert: a Hugging Face Llama / Mistral / Qwen2 directory -> an orbax checkpoint jaxserve can serve.

    jaxserve-convert --hf_dir ~/models/Llama-3.2-1B --out /data/llama-3.2-1b --dtype bfloat16 \
        --config_out configs/llama-3.2-1b.toml
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from tqdm import tqdm

from checkpoints.convert import NUMPY_DTYPES, convert, num_hf_tensors, read_hf_config
from checkpoints.hf import CheckpointError

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory: config.json and *.safetensors "
                              "(sharded ones with model.safetensors.index.json).", required=True)
_OUT = flags.DEFINE_string("out", None, "Orbax checkpoint directory to create.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(NUMPY_DTYPES), "Parameter dtype of the checkpoint.")
_CONFIG_OUT = flags.DEFINE_string("config_out", None, "Also write a TOML config serving the checkpoint here.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def main(argv: list[str]) -> None:
    """Converts, showing a progress bar over tensors, and prints a one-line summary."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    try:
        total = num_hf_tensors(read_hf_config(_HF_DIR.value, _DTYPE.value))
        with tqdm(total=total, unit="tensor", desc="converting") as bar:
            summary = convert(_HF_DIR.value, _OUT.value, _DTYPE.value, _CONFIG_OUT.value, _OVERWRITE.value,
                              on_tensor=bar.update)
    except CheckpointError as e:
        sys.exit(f"jaxserve-convert: error: {e}")
    print(summary.line())


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
