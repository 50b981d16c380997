"""`snapkv-generate` as a user runs it: a subprocess on a tiny checkpoint with its own tokenizer."""

import io
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


def write_tiny_checkpoint(directory: str, **overrides) -> str:
    """A random tiny model with a word-level tokenizer over WORDS, saved at `directory`."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")
    cfg = sk.ModelConfig.tiny(vocab_size=len(WORDS), eos_token_id=1, **overrides)
    checkpoint.save(directory, cfg, sk.init_params(cfg, jax.random.key(0)), tokenizer)
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


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
    assert "mode: snapkv(window=4, capacity=16, kernel=3, pooling='maxpool', gqa_reduce='mean')" in report
    assert "prompt tokens: 60" in report
    assert "kept prompt slots per layer: 16 in each of 2 layers" in report
    assert "KV-cache bytes: full" in report and "x smaller" in report
    assert "compile:" in report and "prefill:" in report
    assert "decode:" in report and "tokens/s" in report and "nan" not in report


@pytest.mark.parametrize("flag", [["--no-snap"], ["--method", "full"]])
def test_full_cache_keeps_every_prompt_slot(tiny_checkpoint, capsys, flag):
    prompt = " ".join(f"w{i % 40}" for i in range(30))
    assert main(["--checkpoint", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "3", *flag]) == 0
    err = capsys.readouterr().err
    assert "mode: full cache" in err and "kept prompt slots per layer: 30 in each of 2 layers" in err


@pytest.mark.parametrize("args, mode, kept", [
    (["--method", "snapkv", "--capacity", "12", "--window", "4"], "snapkv(window=4, capacity=12", "12 in each"),
    (["--method", "streamingllm", "--capacity", "12", "--sinks", "2"], "streamingllm(capacity=12, sinks=2)",
     "12 in each"),
    (["--method", "h2o", "--capacity", "12", "--window", "4", "--normalize"],
     "h2o(capacity=12, window=4, normalize=True", "12 in each"),
    (["--method", "random", "--capacity", "12", "--window", "4", "--selection-seed", "3"],
     "random(capacity=12, window=4, seed=3)", "12 in each"),
    # Two layers, p = 8, beta 4: min_p = 2, max_p = 14, step 12: layers keep 14 and 2 prefix positions.
    (["--method", "pyramidkv", "--capacity", "12", "--window", "4", "--beta", "4"],
     "pyramidkv(capacity=12, window=4, beta=4", "18, 6"),
    # Ada-KV: the layer's width is max_per_head + window.
    (["--method", "adakv", "--capacity", "12", "--window", "4", "--max-per-head", "10"],
     "adakv(capacity=12, window=4, alpha=0.2, max_per_head=10", "14 in each"),
    # KVzip: its instruction spelt by the checkpoint's tokenizer, the context re-read in chunks of 16.
    (["--method", "kvzip", "--capacity", "12", "--sinks", "2", "--reconstruct-chunk", "16"],
     "kvzip(capacity=12, sinks=2, chunk=16, normalize=False, budget=layer", "12 in each"),
])
def test_every_method_runs_from_the_cli(tiny_checkpoint, capsys, args, mode, kept):
    prompt = " ".join(f"w{i % 40}" for i in range(40))
    assert main(["--checkpoint", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "4", "--raw",
                 *args]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert f"mode: {mode}" in err and f"kept prompt slots per layer: {kept}" in err
    assert "prompt tokens: 40" in err


def test_kvzip_global_budget_compiles_ahead_of_time_and_runs(tiny_checkpoint, capsys):
    """The CLI compiles every program first, the global budget's last step included."""
    prompt = " ".join(f"w{i % 40}" for i in range(40))
    assert main(["--checkpoint", tiny_checkpoint, "--prompt", prompt, "--max-new-tokens", "3", "--raw",
                 "--method", "kvzip", "--capacity", "12", "--sinks", "2", "--budget", "global",
                 "--max-per-head", "16", "--reconstruct-chunk", "16"]) == 0
    err = capsys.readouterr().err
    assert "mode: kvzip(capacity=12, sinks=2, chunk=16, normalize=False, budget=global, max_per_head=16" in err


def test_a_one_token_answer_reports_no_decode_rate(tiny_checkpoint, capsys):
    assert main(["--checkpoint", tiny_checkpoint, "--prompt", "w1 w2 w3", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "decode: no decode step (1 token)" in err and "nan" not in err


@pytest.mark.parametrize("args, message", [
    (["--capacity", "8", "--window", "8"], "capacity=8 must be an integer greater than window=8"),
    (["--kernel", "4"], "kernel=4 must be an odd integer"),
    (["--pooling", "median"], "unknown SnapKV pooling 'median'"),
    (["--gqa-reduce", "sum"], "unknown SnapKV gqa_reduce 'sum'"),
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer"),
    (["--top-p", "1.5"], "top_p must be in"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**32)"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such checkpoint directory"),
    (["--method", "quest"], "unknown method 'quest'"),
    (["--method", "streamingllm", "--kernel", "3"], "--kernel does not apply to --method streamingllm"),
    (["--no-snap", "--capacity", "64"], "--capacity does not apply to the full cache"),
    (["--method", "streamingllm", "--capacity", "4", "--sinks", "4"], "capacity=4 must be greater than sinks=4"),
    (["--method", "adakv", "--alpha", "1.5"], "alpha=1.5 puts the per-head floor"),
    (["--method", "pyramidkv", "--capacity", "40", "--window", "32"], "leaves the top layer (1 of 2) 0 prefix"),
    (["--chunk", "lots"], "--chunk must be auto, none or an integer"),
    (["--method", "kvzip", "--budget", "heads"], "unknown KVzip budget 'heads'"),
    (["--method", "snapkv", "--budget", "global"], "--budget does not apply to --method snapkv"),
    (["--no-snap", "--method", "h2o"], "--no-snap (the full cache) contradicts --method h2o"),
    (["--dtype", "bfloat16"], "holds float32 params, the dtype it was converted to"),
    (["--method", ""], "unknown method ''"),
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


def test_prompt_file_that_is_not_utf8_is_named(tiny_checkpoint, capsys, tmp_path):
    path = tmp_path / "prompt.bin"
    path.write_bytes(b"w1 \xff\xfe w2")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", tiny_checkpoint, "--prompt-file", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (f"snapkv-generate: error: --prompt-file {path} is not UTF-8 text "
                                               f"(invalid start byte at byte 3)")


def test_long_prefill_shows_its_layer_progress(tiny_checkpoint, capsys, monkeypatch):
    from snapkv_jax import layer_prefill
    monkeypatch.setattr(layer_prefill, "auto_progress", lambda plan, batch: True)  # as for a 64K prompt
    assert main(["--checkpoint", tiny_checkpoint, "--prompt", "w1 w2 w3", "--max-new-tokens", "2"]) == 0
    assert "prefill 3 tokens: 100%" in capsys.readouterr().err  # the bar over the layers


def test_bad_knob_in_a_subprocess_prints_no_traceback(tiny_checkpoint):
    done = generate_cli("--checkpoint", tiny_checkpoint, "--prompt", "w1", "--kernel", "2")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "kernel=2" in done.stderr


def test_chat_answers_a_piped_turn_streams_it_and_ends_at_eof(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3 w4\n\n"))               # a turn, a blank line, EOF
    assert main(["--checkpoint", tiny_checkpoint, "--chat", "--max-new-tokens", "5", "--no-snap"]) == 0
    out, err = capsys.readouterr()
    cfg, params, tok = checkpoint.load(tiny_checkpoint)
    want = sk.Sampler(params, cfg, tok).generate("w1 w2 w3 w4", max_new_tokens=5)
    assert out == want + "\n"
    assert err.count("--- turn") == 1 and "mode: full cache" in err and "prompt tokens: 4" in err
    assert "live cache slots: 8" in err                                         # 4 + 5 - 1 (last not fed)


def test_chat_takes_top_k_with_top_p_as_one_prompt_does(tiny_checkpoint, capsys, monkeypatch):
    """--chat refused --top-k with --top-p, which the one-prompt mode takes (an audit); its first turn now
    samples what the Sampler samples with the matching strategy and seed."""
    flags = ["--max-new-tokens", "5", "--no-snap", "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9",
             "--seed", "3"]
    monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3 w4\n"))
    assert main(["--checkpoint", tiny_checkpoint, "--chat", *flags]) == 0
    out, _ = capsys.readouterr()
    cfg, params, tok = checkpoint.load(tiny_checkpoint)
    want = sk.Sampler(params, cfg, tok).generate("w1 w2 w3 w4", max_new_tokens=5, seed=3,
                                                 sampling=sk.TopK(5, 0.8, top_p=0.9))
    assert out == want + "\n"


def test_chat_through_piped_stdin_in_a_subprocess(tiny_checkpoint):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "snapkv_jax.cli", "--checkpoint", tiny_checkpoint, "--chat",
                           "--prompt", " ".join(f"w{i}" for i in range(30)), "--capacity", "16", "--window", "4",
                           "--recompress-at", "24", "--max-new-tokens", "4"],
                          input="w1 w2 w3\nw4 w5 w6 w7 w8 w9\n", capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3                                    # the --prompt turn + 2 lines
    assert [f"--- turn {i}" in done.stderr for i in (1, 2, 3)] == [True] * 3
    lives = [int(line.split()[3]) for line in done.stderr.splitlines() if line.startswith("live cache slots")]
    assert len(lives) == 3 and max(lives) <= 24
    assert "Traceback" not in done.stderr


def test_chat_flags_need_chat_and_a_prompt_needs_one_or_the_other(tiny_checkpoint, capsys):
    for args, message in [([], "give --prompt or --prompt-file"),
                          (["--prompt", "w1", "--recompress-at", "40"], "--recompress-at applies to --chat"),
                          (["--chat", "--method", "full", "--recompress-at", "40"],
                           "--recompress-at needs a compression method; the full cache"),
                          (["--chat", "--method", "kvzip", "--recompress-at", "40"],
                           "--recompress-at needs a method that can re-compress a live cache; kvzip cannot")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["--checkpoint", tiny_checkpoint, *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("args, message", [
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-k", "-3"], "top_k must be an integer in [0, 42], got -3"),
])
def test_chat_refuses_bad_sampling_flags_as_one_prompt_does(tiny_checkpoint, capsys, args, message):
    """Before, --chat at the default temperature 0 took these silently (Greedy ignores them), where the
    one-prompt mode refused them."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", tiny_checkpoint, "--chat", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


# --- the demo (`make demo`), which runs through the same `run` --------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/nonexistent/ckpt"], "no such checkpoint directory: /nonexistent/ckpt"),
    (["--capacity", "8"], "SnapKV capacity=8 must be an integer greater than window=32"),
    (["--prompt-tokens", "4000"], "more than the model's max_position_embeddings"),
])
def test_demo_bad_input_is_one_line(tiny_checkpoint, capsys, args, message):
    from snapkv_jax.demo import main as demo
    with pytest.raises(SystemExit) as exit_:
        demo(["--checkpoint", tiny_checkpoint, *args])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == 2 and err[-1].startswith("snapkv-demo: error: ") and message in err[-1], err
    assert not any("Traceback" in ln for ln in err)


def test_demo_runs_every_method_it_offers(tiny_checkpoint, capsys):
    """KVzip included, whose instruction is spelt in the checkpoint's tokenizer."""
    from snapkv_jax.demo import main as demo
    assert demo(["--checkpoint", tiny_checkpoint, "--method", "kvzip", "--capacity", "40",
                 "--prompt-tokens", "100"]) == 0
    out = capsys.readouterr().out
    assert "== kvzip ==" in out and "== full cache ==" in out and "summary: kvzip:" in out
