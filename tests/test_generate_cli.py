"""`snapkv-generate` as a user runs it: a subprocess on a tiny checkpoint with its own tokenizer."""

import os
import subprocess
import sys

import jax
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import snapkv_jax as sk
from snapkv_jax import checkpoint
from snapkv_jax.cli import main

WORDS = ["[UNK]", "</s>"] + [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    cfg = sk.ModelConfig.tiny(vocab_size=len(WORDS), eos_token_id=1)
    directory = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    checkpoint.save(directory, cfg, sk.init_params(cfg, jax.random.key(0)), tokenizer)
    return directory


def generate_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "snapkv_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_subprocess_reports_compression(tiny_checkpoint):
    prompt = " ".join(f"w{i % 40}" for i in range(60))
    done = generate_cli("--checkpoint", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "5",
                        "--window", "4", "--capacity", "16", "--kernel", "3")
    assert done.returncode == 0, done.stderr
    report = done.stderr.split("---\n", 1)[1]
    assert "SnapKV window=4 capacity=16 kernel=3 pooling=maxpool gqa_reduce=mean" in report
    assert "prompt tokens: 60" in report
    assert "kept prompt slots per layer: 16 in each of 2 layers" in report
    assert "KV-cache bytes: full" in report and "x smaller" in report
    assert "prefill:" in report and "decode:" in report and "tokens/s" in report


def test_no_snap_keeps_every_prompt_slot(tiny_checkpoint, capsys):
    prompt = " ".join(f"w{i % 40}" for i in range(30))
    assert main(["--checkpoint", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "3",
                 "--no-snap"]) == 0
    err = capsys.readouterr().err
    assert "full cache (--no-snap)" in err and "kept prompt slots per layer: 30 in each of 2 layers" in err


@pytest.mark.parametrize("args, message", [
    (["--capacity", "8", "--window", "8"], "capacity=8 must be an integer greater than window=8"),
    (["--kernel", "4"], "kernel=4 must be an odd integer"),
    (["--pooling", "median"], "unknown SnapKV pooling 'median'"),
    (["--gqa-reduce", "sum"], "unknown SnapKV gqa_reduce 'sum'"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**32)"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such checkpoint directory"),
])
def test_bad_knobs_give_one_line_errors(tiny_checkpoint, capsys, args, message):
    base = ["--prompt", "w1 w2 w3"]
    if "--checkpoint" not in args:
        base += ["--checkpoint", tiny_checkpoint]
    with pytest.raises(SystemExit) as exit_info:
        main(base + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("snapkv-generate: error:") and message in err


def test_bad_knob_in_a_subprocess_prints_no_traceback(tiny_checkpoint):
    done = generate_cli("--checkpoint", tiny_checkpoint, "--prompt", "w1", "--kernel", "2")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "kernel=2" in done.stderr
