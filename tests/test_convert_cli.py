"""`snapkv-convert`: HF round trips, and every bad input as one stderr line, exit status 2, nothing written.

The CLI's `main` runs in-process (capsys reads stderr); one test runs it as a real subprocess.
"""

import gc
import json
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

from conversion import atomic, convert
from conversion.cli import main
from conversion.convert import convert_hf
import snapkv_jax as sk
from snapkv_jax import checkpoint
from tests import helpers_convert as hc
from tests import hf_models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model():
    return hc.tiny_hf_model(seed=2)


@pytest.fixture
def hf_dir(tmp_path, tiny_model):
    return hf_models.save(tiny_model, tmp_path / "hf")


def _error_line(capsys) -> str:
    """The CLI's stderr, asserted to end in exactly one `snapkv-convert: error:` line."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("snapkv-convert: error: "), err
    assert sum("error" in ln for ln in lines) == 1, err
    return lines[-1]


def _entries(directory) -> list[str]:
    return sorted(os.listdir(directory))


# --- HF round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single_file", "sharded"])
def test_hf_round_trip_is_exact(tmp_path, tiny_model, shard):
    hf = hf_models.save(tiny_model, tmp_path / "hf", **({"max_shard_size": shard} if shard else {}))
    files = sorted(f for f in os.listdir(hf) if f.endswith(".safetensors"))
    assert (len(files) > 1) == (shard is not None)
    assert main(["--hf", hf, str(tmp_path / "out")]) == 0
    cfg, params, tok = checkpoint.load(str(tmp_path / "out"))
    assert tok is None  # the HF dir has no tokenizer files
    stored = {k: v for f in files for k, v in load_file(os.path.join(hf, f)).items()}
    assert len(stored) == 9 * cfg.num_layers + 3  # 9 tensors per layer + embed, final norm, lm_head
    for name, x in stored.items():
        np.testing.assert_array_equal(hc.params_leaf(params, name), x, err_msg=name)


def test_hf_tokenizer_is_copied(tmp_path, hf_dir):
    hc.tiny_tokenizer().save_pretrained(hf_dir)
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 0
    *_, tok = checkpoint.load(str(tmp_path / "out"))
    assert tok("w5 w7 w90")["input_ids"] == [5, 7, 90]


def test_bfloat16_output(tmp_path, hf_dir, tiny_model):
    assert main(["--hf", hf_dir, str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    _, params, _ = checkpoint.load(str(tmp_path / "out"))
    leaf = params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert str(leaf.dtype) == "bfloat16"
    w = tiny_model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(leaf, np.float32).T, w, rtol=2 ** -8)


# --- bad inputs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--hf", "--gguf"])
def test_missing_input_path(tmp_path, capsys, flag):
    missing = str(tmp_path / "nope")
    assert main([flag, missing, str(tmp_path / "out")]) == 2
    assert missing in _error_line(capsys)
    assert _entries(tmp_path) == []


def test_an_input_or_output_of_the_wrong_kind_is_named_for_what_it_is(tmp_path, capsys, hf_dir):
    """A file given as --hf, a directory as --gguf, and a symbolic link to a checkpoint as the output with
    --overwrite are refused naming what they are (they were called missing, or "not a directory")."""
    (tmp_path / "m.gguf").write_text("x")
    cases = [(["--hf", str(tmp_path / "m.gguf")], f"{tmp_path / 'm.gguf'} is not a directory"),
             (["--gguf", hf_dir], f"{hf_dir} is a directory, not a GGUF file")]
    for flag_and_input, message in cases:
        assert main(flag_and_input + [str(tmp_path / "out")]) == 2
        assert message in _error_line(capsys)
    assert main(["--hf", hf_dir, str(tmp_path / "ckpt")]) == 0
    os.symlink(tmp_path / "ckpt", tmp_path / "link")
    assert main(["--hf", hf_dir, str(tmp_path / "link"), "--overwrite"]) == 2
    assert f"output {tmp_path / 'link'} is a symbolic link; refusing to replace it" in _error_line(capsys)
    assert _entries(tmp_path) == ["ckpt", "hf", "link", "m.gguf"]


def test_output_under_a_regular_file_is_refused_before_reading(tmp_path, capsys, hf_dir, monkeypatch):
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(convert, "load_hf", lambda *a, **k: pytest.fail("read the model first"))
    assert main(["--hf", hf_dir, str(tmp_path / "afile" / "sub" / "out")]) == 2
    assert f"{tmp_path / 'afile'} is not a directory" in _error_line(capsys)
    assert _entries(tmp_path) == ["afile", "hf"]


def test_broken_tokenizer_file_is_named_before_reading(tmp_path, capsys, hf_dir, monkeypatch):
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
        f.write("{garbage")
    monkeypatch.setattr(convert, "load_hf", lambda *a, **k: pytest.fail("read the model first"))
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert f"cannot load the tokenizer of {hf_dir} (tokenizer.json)" in line
    assert "out" not in _entries(tmp_path)


def test_dir_without_config_json(tmp_path, capsys, hf_dir):
    os.remove(os.path.join(hf_dir, "config.json"))
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    assert "config.json" in _error_line(capsys)
    assert _entries(tmp_path) == ["hf"]


@pytest.mark.parametrize("fields, named", [
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "attention_bias": True}, "qwen2"),
    ({"attention_bias": True}, "attention_bias"),
    # were read as other values: 0 fell through `or` to the defaults, bool("false") is True
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer or absent, got 0"),
    ({"head_dim": 0}, "head_dim must be a positive integer or absent, got 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    # transformers fails on it in the forward; we ignored it
    ({"partial_rotary_factor": 0.5, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "partial_rotary_factor=0.5 with rope type 'linear'"),
], ids=["qwen2", "llama_with_attention_bias", "kv_heads_0", "head_dim_0", "tie_a_string", "partial_rotary"])
def test_unsupported_architecture_is_named(tmp_path, capsys, hf_dir, fields, named):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(config | fields, f)
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    assert named in _error_line(capsys)
    assert _entries(tmp_path) == ["hf"]


def _rewrite_config(hf_dir, edit):
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(edit(config), f)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.mark.parametrize("damage, named", [
    (lambda d: _rewrite_config(d, lambda c: [c]), "config.json must hold a JSON object (a HF config), got a list"),
    (lambda d: _rewrite_config(d, lambda c: c | {"rope_scaling": "linear"}), "rope_scaling must be a JSON object"),
    (lambda d: _rewrite_config(d, lambda c: c | {"architectures": "LlamaForCausalLM"}),
     "architectures must be a list of names"),
    (lambda d: _write(os.path.join(d, "model.safetensors.index.json"), '{"metadata": {}}'),
     "model.safetensors.index.json is not a safetensors index with a weight_map"),
    (lambda d: _write(os.path.join(d, "model.safetensors.index.json"), "{"),
     "model.safetensors.index.json is not a safetensors index with a weight_map"),
], ids=["config_a_list", "rope_scaling_a_string", "architectures_a_string", "index_without_weight_map",
        "index_not_json"])
def test_malformed_config_or_index_is_one_line(tmp_path, capsys, hf_dir, damage, named):
    """Malformed, not merely unsupported, JSON: it raised AttributeError or KeyError, a traceback."""
    damage(hf_dir)
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    assert named in _error_line(capsys)
    assert _entries(tmp_path) == ["hf"]


@pytest.mark.parametrize("damage, named", [
    (lambda d: _write(os.path.join(d, "config.json"), "{"), "config.json is not valid JSON"),
    (lambda d: _rewrite_config(d, lambda c: c | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
     "unsupported model_type='qwen2'"),
], ids=["config_not_json", "qwen2"])
def test_config_is_judged_before_the_tokenizer(tmp_path, capsys, hf_dir, damage, named):
    """A bad config.json beside good tokenizer files was reported as the tokenizer's failure (transformers
    reads config.json to pick the tokenizer class)."""
    hc.tiny_tokenizer().save_pretrained(hf_dir)
    damage(hf_dir)
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert named in line and "tokenizer" not in line, line
    assert _entries(tmp_path) == ["hf"]


def test_tokenizer_config_without_a_vocabulary_is_refused(tmp_path, capsys, hf_dir):
    """transformers loads a lone tokenizer_config.json as a tokenizer of its special tokens, which encodes
    every text to no ids: converting it wrote a checkpoint whose prompts all came out empty."""
    _write(os.path.join(hf_dir, "tokenizer_config.json"), json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    assert "has no vocabulary" in _error_line(capsys)
    assert _entries(tmp_path) == ["hf"]


def test_truncated_safetensors(tmp_path, capsys, hf_dir):
    hc.truncate(os.path.join(hf_dir, "model.safetensors"))
    assert main(["--hf", hf_dir, str(tmp_path / "out")]) == 2
    assert "model.safetensors" in _error_line(capsys)
    assert _entries(tmp_path) == ["hf"]


def test_truncated_gguf(tmp_path, capsys, tiny_model):
    path = hc.write_llama_gguf(tmp_path / "m.gguf", tiny_model)
    hc.truncate(path)
    assert main(["--gguf", path, str(tmp_path / "out")]) == 2
    assert "m.gguf" in _error_line(capsys)
    assert _entries(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("qtype, data", [
    (None, np.ones(64, np.float64)),                     # F64
    (Q.IQ4_NL, np.zeros((1, 2 * 18), np.uint8)),         # an i-quant: 2 blocks of 32 values, 18 bytes each
], ids=["F64", "IQ4_NL"])
def test_unsupported_gguf_tensor_type_is_named(tmp_path, capsys, tiny_model, qtype, data):
    model = hc.tiny_hf_model(seed=2, tie=True)  # no output.weight: the extra tensor takes its place
    path = hc.write_llama_gguf(tmp_path / "m.gguf", model, extra_tensors=[("output.weight", data, qtype)])
    assert main(["--gguf", path, str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert "output.weight" in line and (qtype.name if qtype else "F64") in line
    assert _entries(tmp_path) == ["m.gguf"]


def test_existing_output_without_overwrite(tmp_path, capsys, hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["--hf", hf_dir, str(out)]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert _entries(out) == ["keep.txt"]
    # The Python API raises a ValueError (DESIGN section 6) that is also a FileExistsError.
    for call in (lambda: convert_hf(hf_dir, str(out)), lambda: convert_hf(hf_dir, str(out), overwrite=True)):
        with pytest.raises(ValueError, match=re.escape(str(out))) as raised:
            call()
        assert isinstance(raised.value, FileExistsError)
    assert _entries(out) == ["keep.txt"]


def test_overwrite_replaces_a_checkpoint(tmp_path, hf_dir):
    out = str(tmp_path / "out")
    assert main(["--hf", hf_dir, out]) == 0
    assert main(["--hf", hf_dir, out, "--dtype", "bfloat16", "--overwrite"]) == 0
    _, params, _ = checkpoint.load(out)
    assert str(params["final_norm"]["scale"].dtype) == "bfloat16"
    assert _entries(tmp_path) == ["hf", "out"]


def test_overwrite_refuses_a_directory_that_is_not_a_checkpoint(tmp_path, capsys, hf_dir):
    assert main(["--hf", hf_dir, hf_dir, "--overwrite"]) == 2
    assert "not a snapkv-jax checkpoint" in _error_line(capsys)
    assert "config.json" in _entries(hf_dir)


def test_exception_mid_write_leaves_nothing(tmp_path, hf_dir, monkeypatch):
    real_save = atomic.checkpoint.save

    def save_then_fail(out_dir, *args, **kwargs):
        real_save(out_dir, *args, **kwargs)
        assert os.listdir(out_dir)  # something half-written exists now
        raise RuntimeError("injected failure")

    monkeypatch.setattr(atomic.checkpoint, "save", save_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        main(["--hf", hf_dir, str(tmp_path / "out")])
    assert _entries(tmp_path) == ["hf"]  # neither out/ nor .out.tmp-*


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_signal_during_the_write_leaves_nothing(tmp_path, capsys, hf_dir, monkeypatch, signum):
    """A signal while orbax writes waits for the write to end (its threads would otherwise keep writing
    into the directory being removed), then removes it and the parents that OUT needed: exit 130."""
    real_save = atomic.checkpoint.save

    def signalled_save(*args, **kwargs):
        os.kill(os.getpid(), signum)  # handled here, between bytecodes: before the write starts
        real_save(*args, **kwargs)

    monkeypatch.setattr(atomic.checkpoint, "save", signalled_save)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert main(["--hf", hf_dir, str(tmp_path / "a" / "b" / "out")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert sum(ln.startswith("interrupted: removing the partial checkpoint once its write ends") for ln in err) == 1
    assert err[-1] == f"snapkv-convert: interrupted; {tmp_path / 'a' / 'b' / 'out'} was not written"
    assert _entries(tmp_path) == ["hf"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the CLI's handlers are undone


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_signal_inside_a_gc_callback_still_interrupts(tmp_path, capsys, hf_dir, monkeypatch, signum):
    """jax runs a gc callback at every collection (often while tensors are read), and Python drops an
    exception raised inside one: a signal that arrives there still stops the run, exit 130."""
    sent = []

    def signalling_callback(phase, info):
        if not sent:
            sent.append(phase)
            os.kill(os.getpid(), signum)  # handled here, inside the callback

    real_load = convert.load_hf

    def collecting_load(*args, **kwargs):
        gc.callbacks.append(signalling_callback)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(signalling_callback)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(convert, "load_hf", collecting_load)
    out = tmp_path / "out"
    assert main(["--hf", hf_dir, str(out)]) == 130
    err = capsys.readouterr().err
    assert "Exception ignored" not in err and err.strip().splitlines()[-1] == (
        f"snapkv-convert: interrupted; {out} was not written")
    assert sent and _entries(tmp_path) == ["hf"]


def test_signal_while_publishing_lets_the_publication_finish(tmp_path, capsys, hf_dir, monkeypatch):
    """Past verification only renames remain (and an old checkpoint's removal): a signal then waits for
    them and the run ends as written, never with the old checkpoint half-deleted."""
    real_publish = atomic._publish

    def signalled_publish(*args):
        os.kill(os.getpid(), signal.SIGINT)
        real_publish(*args)

    monkeypatch.setattr(atomic, "_publish", signalled_publish)
    out = str(tmp_path / "out")
    assert main(["--hf", hf_dir, out]) == 0
    assert "interrupted: finishing the checkpoint's publication" in capsys.readouterr().err
    assert checkpoint.load(out)[0] is not None and _entries(tmp_path) == ["hf", "out"]


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, hf_dir, monkeypatch):
    out = str(tmp_path / "out")
    assert main(["--hf", hf_dir, out]) == 0

    def verify_fails(*args):
        raise ValueError("bad reload")

    monkeypatch.setattr(atomic, "verify", verify_fails)
    assert main(["--hf", hf_dir, out, "--dtype", "bfloat16", "--overwrite"]) == 2
    _, params, _ = checkpoint.load(out)
    assert str(params["final_norm"]["scale"].dtype) == "float32"
    assert _entries(tmp_path) == ["hf", "out"]


def test_subprocess_reports_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "conversion.cli", "--hf", str(tmp_path / "nope"),
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    expected = f"snapkv-convert: error: no such directory: {tmp_path / 'nope'}"
    assert proc.stderr.strip().splitlines() == [expected]
    assert "Traceback" not in proc.stderr


SAVE_ON_TWO_DEVICES = """
import sys, jax, numpy as np
import snapkv_jax as sk
from snapkv_jax import checkpoint
from jax.sharding import Mesh, NamedSharding, PartitionSpec
assert len(jax.devices()) == 2
cfg = sk.ModelConfig.tiny()
mesh = Mesh(np.array(jax.devices()), ("x",))
params = jax.device_put(sk.init_params(cfg, jax.random.key(0)), NamedSharding(mesh, PartitionSpec()))
checkpoint.save(sys.argv[1], cfg, params)
np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree_util.tree_leaves(params)])
"""


def test_checkpoint_saved_on_other_devices_loads_here(tmp_path):
    """A checkpoint written from other devices (a GPU, or several) restores onto this one: seen on an
    H100, where a checkpoint saved by the GPU process failed to load in a CPU subprocess."""
    # Two devices there; otherwise conftest's flags.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2",
               PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, "-c", SAVE_ON_TWO_DEVICES, str(tmp_path / "ckpt"),
                           str(tmp_path / "saved.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, params, _ = checkpoint.load(str(tmp_path / "ckpt"))
    # Compared with what the saving process held: init_params here, on a GPU, draws other last bits.
    saved = np.load(tmp_path / "saved.npz")
    leaves = jax.tree_util.tree_leaves(params)
    assert len(leaves) == len(saved.files)
    for i, got in enumerate(leaves):
        np.testing.assert_array_equal(got, saved[f"arr_{i}"])


def test_the_library_and_cli_import_without_gguf_and_only_a_gguf_conversion_asks_for_it(tmp_path):
    """gguf is needed to read GGUF files, not to import snapkv_jax (the GPU machine lacks it)."""
    program = f"""
import sys
sys.modules["gguf"] = None  # any import of gguf now raises ImportError
import snapkv_jax
from conversion.cli import main
sys.exit(main(["--gguf", "model.gguf", {str(tmp_path / "out")!r}]))
"""
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith("snapkv-convert: error: converting a GGUF file needs the gguf package"), out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
