"""python -m npllm.convert: Hugging Face model directories into npllm runs, and npllm runs back out.

    python -m npllm.convert --from_hf=DIR --out=RUN                 RUN/ckpt_00000000 and RUN/tokenizer
    python -m npllm.convert --ckpt=RUN --to_hf=DIR [--dtype=bfloat16]   config.json, model.safetensors, tokenizer

A converted run is what generate, evaluate and ``train --init_from`` read; those three also read a Hugging Face
directory directly (``npllm.run.load_trained``). The weights go through ``npllm.hf`` (GPT2LMHeadModel and
LlamaForCausalLM; the name tables, layouts and dtypes are described in docs/hf.md). An exported directory holds the
run's tokenizer files as they are: a sentencepiece ``tokenizer.model`` (which transformers' LlamaTokenizer reads),
a Hugging Face ``tokenizer.json``, or our character table.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .checks import check_choice
from .cli import run_command
from .config import TrainConfig, options_help, parse_options
from .files import atomic_write


@dataclass(frozen=True)
class ConvertConfig:
    """Every option of ``python -m npllm.convert``."""

    from_hf: str | None = None  # a Hugging Face model directory to read (with --out)
    out: str | None = None  # the npllm run directory to write
    ckpt: str | None = None  # an npllm run or checkpoint directory to read (with --to_hf)
    to_hf: str | None = None  # the Hugging Face model directory to write
    dtype: str = "float32"  # the stored dtype of --to_hf: float32, float16, bfloat16 or float64
    overwrite: bool = False  # replace an existing --to_hf directory / move an existing run in --out aside

    def __post_init__(self):
        if (self.from_hf is None) == (self.ckpt is None) or (self.from_hf is None) != (self.out is None) or (
                self.ckpt is None) != (self.to_hf is None):
            raise ValueError("give --from_hf=DIR --out=RUN, or --ckpt=RUN --to_hf=DIR")
        check_choice("dtype", self.dtype, ("float32", "float16", "bfloat16", "float64"))


def from_hf(hf_dir, run_dir, overwrite: bool = False) -> Path:
    """An npllm run holding the Hugging Face model of ``hf_dir``: its weights as checkpoint 0 (no optimizer state:
    continue from it with ``train --init_from``), its tokenizer as RUN/tokenizer. Returns the checkpoint."""
    from .checkpoint import save_checkpoint
    from .run import RunMeta, TokenizerRef, claim_run_dir, load_trained
    from .tokenizer import copy_tokenizer

    trained = load_trained(hf_dir)
    run_dir = Path(run_dir)
    lock = claim_run_dir(run_dir, resume=False, overwrite=overwrite)
    try:
        copy_tokenizer(trained.tokenizer, run_dir / "tokenizer")
        meta = RunMeta(model_config=trained.cfg, train_config=TrainConfig(out_dir=str(run_dir), init_from=str(hf_dir)),
                       step=0, sampler=dict(seed=0, step=0),
                       tokenizer=TokenizerRef("../tokenizer", trained.tokenizer.fingerprint), data_dir=str(hf_dir))
        return save_checkpoint(run_dir, 0, trained.params, None, meta.to_json())
    finally:
        lock.release()


def to_hf(ckpt, hf_dir, dtype: str = "float32", overwrite: bool = False) -> Path:
    """The model of an npllm run as a Hugging Face directory that ``from_pretrained`` loads, with the run's
    tokenizer files beside it."""
    from .hf import save_hf
    from .run import load_trained

    trained = load_trained(ckpt)
    out = save_hf(trained.params, trained.cfg, hf_dir, dtype, overwrite=overwrite)
    for name, content in trained.tokenizer.files.items():
        target = "tokenizer.json" if name == "hf_tokenizer.json" else name  # our copies rename HF's tokenizer.json
        if target != "config.json":
            atomic_write(out / target, content)
    return out


def run(cc: ConvertConfig) -> None:
    if cc.from_hf is not None:
        print(f"wrote {from_hf(cc.from_hf, cc.out, cc.overwrite)}")
    else:
        print(f"wrote {to_hf(cc.ckpt, cc.to_hf, cc.dtype, cc.overwrite)}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(__doc__.split("\n\nA converted")[0] + "\n\nOptions:\n" + options_help(ConvertConfig))
        return 0
    return run_command("npllm.convert", lambda a: run(ConvertConfig(**parse_options(a, ConvertConfig)[0])), argv)


if __name__ == "__main__":
    sys.exit(main())
