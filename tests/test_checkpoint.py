"""`checkpoint.load` on damaged or mismatched checkpoints: one ValueError naming the directory, raised
before any tensor is restored where the metadata alone shows the problem (never orbax's traceback)."""

import json
import os
import subprocess
import sys

import jax
import pytest

import snapkv_jax as sk
from snapkv_jax import checkpoint
from snapkv_jax.cli import main


@pytest.fixture
def saved(tmp_path):
    cfg = sk.ModelConfig.tiny()
    directory = str(tmp_path / "ckpt")
    checkpoint.save(directory, cfg, sk.init_params(cfg, jax.random.key(0)))
    return directory


def _edit_config(directory, **fields):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump(config | fields, f)


def _largest_file(directory):
    files = [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("params, message", [
    (lambda p: jax.tree_util.tree_map(lambda x: x.astype("float16"), p), r"must all be float32 or all bfloat16"),
    (lambda p: sk.init_params(sk.ModelConfig.tiny(vocab_size=50), jax.random.key(0)),
     r"\['embed'\]\['embedding'\] is \[50, 64\], the config needs \[97, 64\]"),
    (lambda p: {k: v for k, v in p.items() if k != "layers_1"}, r"\['layers_1'\].* is missing"),
], ids=["float16", "another_vocabulary", "a_layer_missing"])
def test_save_refuses_params_it_could_not_load_and_writes_nothing(tmp_path, params, message):
    """Params of another config were written into a checkpoint that load then refused; a dtype refusal
    left the empty output directory behind."""
    cfg = sk.ModelConfig.tiny()
    with pytest.raises(ValueError, match=message):
        checkpoint.save(str(tmp_path / "out"), cfg, params(sk.init_params(cfg, jax.random.key(0))))
    assert not (tmp_path / "out").exists()


def test_round_trip_still_loads(saved):
    cfg, params, tokenizer = checkpoint.load(saved)
    assert cfg == sk.ModelConfig.tiny() and tokenizer is None
    assert params["embed"]["embedding"].shape == (cfg.vocab_size, cfg.hidden_size)


def test_config_that_is_not_json_is_named(saved):
    with open(os.path.join(saved, "config.json"), "w") as f:
        f.write("{bad")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        checkpoint.load(saved)


@pytest.mark.parametrize("config, message", [
    ([1, 2], r"config\.json must hold a JSON object \(the model's config\), got a list"),
    ({"snapkv_jax": ["float32"]}, r"unsupported params dtype \['float32'\]"),
    ({"snapkv_jax": "float64"}, r"unsupported params dtype 'float64'"),
], ids=["a_list", "dtype_a_list", "snapkv_jax_a_string"])
def test_config_of_the_wrong_shape_is_named(saved, config, message):
    """Valid JSON of the wrong shape raised TypeError / AttributeError from inside load."""
    if isinstance(config, dict):
        _edit_config(saved, **config)
    else:
        with open(os.path.join(saved, "config.json"), "w") as f:
            json.dump(config, f)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(saved)


def test_stored_shape_unlike_the_config_is_named_before_restoring(saved, capfd):
    _edit_config(saved, vocab_size=sk.ModelConfig.tiny().vocab_size + 1)
    with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\] is float32\[\d+, \d+\], the config "
                                         r"needs float32\[\d+, \d+\]") as raised:
        checkpoint.load(saved)
    assert saved in str(raised.value) and "\n" not in str(raised.value)
    assert "Traceback" not in capfd.readouterr().err  # no restore was started, so no orbax thread's


def test_truncated_tensor_data_is_a_value_error(saved):
    os.truncate(_largest_file(os.path.join(saved, "params")), 100)
    with pytest.raises(ValueError, match=r"params is damaged: .*not valid") as raised:
        checkpoint.load(saved)
    assert saved in str(raised.value) and "\n" not in str(raised.value)


def test_truncated_tensor_data_costs_a_cli_user_one_line(saved):
    """orbax's abandoned reads of the damaged file print tracebacks later, some at exit: none reach the
    user of `snapkv-generate` (a subprocess, so that exit happens)."""
    os.truncate(_largest_file(os.path.join(saved, "params")), 100)
    done = subprocess.run([sys.executable, "-m", "snapkv_jax.cli", "--checkpoint", saved, "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("snapkv-generate: error: ") and "is damaged" in lines[0], \
        done.stderr


def test_unreadable_manifest_prints_no_traceback(saved):
    """An emptied OCDBT manifest (an interrupted copy, say) fails the metadata read, and orbax's
    abandoned reads of it print tracebacks ("Event loop is closed", ...): none reach stderr, in any of
    several loads (a subprocess, so that exit happens too)."""
    open(os.path.join(saved, "params", "manifest.ocdbt"), "w").close()
    script = ("import sys; from snapkv_jax import checkpoint\n"
              "for _ in range(4):\n"
              "    try: checkpoint.load(sys.argv[1])\n"
              "    except ValueError as e: print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", script, saved], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert done.returncode == 0 and done.stdout.count("refused:") == 4, done.stderr
    assert done.stderr == "", done.stderr


def test_missing_metadata_is_a_value_error(saved):
    os.remove(os.path.join(saved, "params", "_METADATA"))
    with pytest.raises(ValueError, match=r"no readable tensor metadata|cannot be read"):
        checkpoint.load(saved)


def test_generate_cli_reports_a_damaged_checkpoint_in_one_line(saved, capsys):
    _edit_config(saved, hidden_size=sk.ModelConfig.tiny().hidden_size * 2,
                 intermediate_size=sk.ModelConfig.tiny().intermediate_size * 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", saved, "--prompt", "hello"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("snapkv-generate: error: ") and saved in err
    assert "stored params do not match" in err
