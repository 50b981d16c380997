"""Several devices (sharding.py, ring_prefill.py) on 4 forced CPU devices (conftest.py sets
`--xla_force_host_platform_device_count=4`): every mesh shape gives the one-device result for forward,
prefill with every compression method, decode and generate; the collectives are the ones the design
names; params load and convert straight onto a mesh; bad meshes get one-line errors."""

import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import checkpoint, layer_prefill, sharding
from snapkv_jax.generate import _decode

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices (conftest forces 4 on the CPU)")

CFG = sk.ModelConfig.tiny(num_heads=8, num_kv_heads=4, intermediate_size=64, vocab_size=96)
WINDOWED = sk.ModelConfig.tiny(num_heads=8, num_kv_heads=4, intermediate_size=64, vocab_size=96, sliding_window=20)
LENGTHS = np.array([78, 50, 71, 64], np.int32)     # ragged, all beyond the capacity but one at 50
METHODS = {
    "full": None,
    "snapkv": sk.SnapKV(window=8, capacity=40, kernel=3),
    "h2o": sk.H2O(capacity=40, window=8),
    "adakv": sk.AdaKV(capacity=40, window=8),
    "random": sk.RandomKV(capacity=40, window=8),
    "pyramidkv": sk.PyramidKV(capacity=40, window=8, beta=4),
    "streamingllm": sk.StreamingLLM(capacity=40),
}
# (data, seq, model): tensor x data parallel meshes, and sequence-parallel ones.
MESHES = [(1, 1, 4), (2, 1, 2), (4, 1, 1), (1, 4, 1), (1, 2, 2), (2, 2, 1)]


def _params(cfg):
    return sk.init_params(cfg, jax.random.key(0))


def _tokens(cfg):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 78))


@pytest.fixture(scope="module")
def one_device():
    """Reference prefills on one device, per (config, method)."""
    out = {}
    for cfg in (CFG, WINDOWED):
        for name, method in METHODS.items():
            out[cfg, name] = sk.prefill(_params(cfg), cfg, _tokens(cfg), LENGTHS, compress=method, chunk=32,
                                        max_slots=100)
    return out


def _same_cache(want, got):
    for a, b in zip(want.pos, got.pos):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the same kept positions
    for a, b in zip(want.k + want.v, got.k + got.v):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    np.testing.assert_array_equal(np.asarray(want.end), np.asarray(got.end))
    np.testing.assert_array_equal(np.asarray(want.next_pos), np.asarray(got.next_pos))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", METHODS)
def test_prefill_on_a_mesh_equals_one_device(one_device, shape, method):
    cfg = WINDOWED if shape in ((1, 4, 1), (2, 1, 2)) else CFG      # sliding window on a ring and on TP
    mesh = sk.make_mesh(*shape)
    logits, cache = sk.prefill(_params(cfg), cfg, _tokens(cfg), LENGTHS, compress=METHODS[method],
                               max_slots=100, mesh=mesh)
    want_logits, want = one_device[cfg, method]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-6)
    _same_cache(want, cache)
    assert cache.k[0].sharding.is_equivalent_to(sharding.named(mesh, "data", "model", None, None), 4)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_forward_decode_and_generate_on_a_mesh(one_device, shape):
    mesh = sk.make_mesh(*shape)
    params, tokens = _params(CFG), _tokens(CFG)
    np.testing.assert_allclose(np.asarray(sk.forward(params, CFG, tokens, mesh=mesh)),
                               np.asarray(sk.forward(params, CFG, tokens)), atol=2e-6)
    logits, cache = one_device[CFG, "snapkv"]
    nxt = np.asarray(jnp.argmax(logits, -1))
    want_logits, want = sk.decode_step(params, CFG, nxt, cache)
    sharded = sk.shard_params(params, CFG, mesh)                      # the mesh is taken from the params
    got_logits, got = sk.decode_step(sharded, CFG, nxt, cache)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), atol=2e-6)
    _same_cache(want, got)
    method = METHODS["snapkv"]
    want = sk.generate(params, CFG, tokens, LENGTHS, max_new_tokens=5, compress=method)
    got = sk.generate(sharded, CFG, tokens, LENGTHS, max_new_tokens=5, compress=method)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


SEGMENT = np.random.default_rng(1).integers(0, 96, (4, 12))
SEGMENT_LENGTHS = np.array([12, 5, 9, 1], np.int32)                    # ragged, one row of a single token
RECOMPRESS = sk.SnapKV(window=4, capacity=40, kernel=3)


@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 1, 2), (2, 2, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method, recompress", [("full", None), ("snapkv", None), ("snapkv", RECOMPRESS)],
                         ids=["full", "snapkv", "recompressed"])
def test_extend_and_its_continuation_on_a_mesh_equal_one_device(one_device, shape, method, recompress):
    """extend of a ragged segment onto a prefill's cache, with and without re-compression, then
    generate(cache=) from it: the same logits, kept slots and tokens as on one device, the cache staying
    split by row and KV head."""
    cfg = WINDOWED if shape == (2, 1, 2) else CFG
    mesh = sk.make_mesh(*shape)
    params = _params(cfg)
    _, cache = one_device[cfg, method]
    want_logits, want = sk.extend(params, cfg, cache, SEGMENT, SEGMENT_LENGTHS, compress=recompress)
    _, on_mesh = sk.prefill(params, cfg, _tokens(cfg), LENGTHS, compress=METHODS[method], chunk=32, max_slots=100,
                            mesh=mesh)
    sharded = sk.shard_params(params, cfg, mesh)                      # the mesh is taken from the params
    logits, got = sk.extend(sharded, cfg, on_mesh, SEGMENT, SEGMENT_LENGTHS, compress=recompress)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-6)
    _same_cache(want, got)
    assert got.k[0].sharding.is_equivalent_to(sharding.named(mesh, "data", "model", None, None), 4)
    question, lengths = SEGMENT[:, :3], np.array([3, 1, 2, 3], np.int32)
    want = sk.generate(params, cfg, question, lengths, max_new_tokens=4, cache=want)
    got = sk.generate(sharded, cfg, question, lengths, max_new_tokens=4, cache=got)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


def test_a_cache_moves_onto_the_params_mesh_but_never_off_it(one_device):
    """A one-device cache goes onto the mesh the params live on (as decode_step's does); a cache on a
    mesh with params on one device is refused in one line (it failed inside jit: "incompatible devices")."""
    params, (_, cache) = _params(CFG), one_device[CFG, "snapkv"]
    mesh = sk.make_mesh(data=2, model=2)
    want_logits, want = sk.extend(params, CFG, cache, SEGMENT, SEGMENT_LENGTHS)
    logits, got = sk.extend(sk.shard_params(params, CFG, mesh), CFG, cache, SEGMENT, SEGMENT_LENGTHS)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-6)
    _same_cache(want, got)
    for call in (lambda: sk.extend(params, CFG, got, SEGMENT, SEGMENT_LENGTHS),
                 lambda: sk.decode_step(params, CFG, np.zeros(4, np.int32), got)):
        with pytest.raises(ValueError, match=re.escape("the cache lives on a mesh (axes {'data': 2, 'seq': 1, "
                                                       "'model': 2}) but the params on one device")):
            call()


@pytest.mark.parametrize("shape", [(1, 1, 4), (1, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_a_shared_context_on_a_mesh_without_data_equals_one_device(shape):
    """context= on the model and seq axes: the context, prefilled on the mesh, split by KV head; the rows'
    questions, their decode loop and extend's logits as on one device."""
    params, mesh = _params(CFG), sk.make_mesh(*shape)
    document = _tokens(CFG)[:1]
    _, context = sk.prefill(params, CFG, document, compress=METHODS["snapkv"])
    want = sk.generate(params, CFG, SEGMENT[:3], SEGMENT_LENGTHS[:3], max_new_tokens=5, context=context)
    want_logits, rows = sk.extend(params, CFG, None, SEGMENT[:3], SEGMENT_LENGTHS[:3], context=context)
    nxt = np.asarray(jnp.argmax(want_logits, -1))
    want_step, _ = sk.decode_step(params, CFG, nxt, rows, context=context)
    sharded = sk.shard_params(params, CFG, mesh)
    _, on_mesh = sk.prefill(sharded, CFG, document, compress=METHODS["snapkv"])
    got = sk.generate(sharded, CFG, SEGMENT[:3], SEGMENT_LENGTHS[:3], max_new_tokens=5, context=on_mesh)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    logits, rows = sk.extend(sharded, CFG, None, SEGMENT[:3], SEGMENT_LENGTHS[:3], context=on_mesh)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-6)
    step, _ = sk.decode_step(sharded, CFG, nxt, rows, context=on_mesh)
    np.testing.assert_allclose(np.asarray(step), np.asarray(want_step), atol=2e-6)
    with pytest.raises(ValueError, match=re.escape("the context lives on one device but this call runs on a mesh")):
        sk.generate(sharded, CFG, SEGMENT[:3], SEGMENT_LENGTHS[:3], max_new_tokens=2, context=context)


def test_a_context_on_a_mesh_never_takes_cudnn(monkeypatch):
    """The cuDNN context pass has not run partitioned over several GPUs: a context on a mesh takes the
    `jnp` path even where one on one device would take cuDNN (forced here: the CPU has no cuDNN)."""
    import importlib
    generate = importlib.import_module("snapkv_jax.generate")   # the module: the package exports a function
    monkeypatch.setattr(generate, "resolve_implementation", lambda implementation, dtype: "cudnn")
    params = _params(CFG)
    _, context = sk.prefill(params, CFG, _tokens(CFG)[:1], compress=METHODS["snapkv"])
    sharded = sk.shard_params(params, CFG, sk.make_mesh(model=4))
    _, on_mesh = sk.prefill(sharded, CFG, _tokens(CFG)[:1], compress=METHODS["snapkv"])
    assert generate.context_flash(params, CFG, context) is True
    assert generate.context_flash(sharded, CFG, on_mesh) is False


def test_a_shared_context_refuses_the_data_axis_in_one_line():
    params = _params(CFG)
    _, context = sk.prefill(params, CFG, _tokens(CFG)[:1])
    mesh = sk.make_mesh(data=2, model=2)
    for call in (lambda: sk.extend(params, CFG, None, SEGMENT[:2], context=context, mesh=mesh),
                 lambda: sk.generate(params, CFG, SEGMENT[:2], max_new_tokens=2, context=context, mesh=mesh)):
        with pytest.raises(ValueError, match=re.escape("context= does not run on a mesh's data axis yet (data=2)")):
            call()


def test_a_context_refused_for_an_explicit_mesh_names_that_mesh():
    """A context prefilled with params on one mesh, then a call with mesh= another one: the refusal
    names the call's mesh as such (it said 'the params on' that mesh, where the params do not live)."""
    params = sk.shard_params(_params(CFG), CFG, sk.make_mesh(model=4))
    _, context = sk.prefill(params, CFG, _tokens(CFG)[:1])
    with pytest.raises(ValueError, match=re.escape("the context lives on a mesh (axes {'data': 1, 'seq': 1, "
                                                   "'model': 4}) but this call runs on a mesh (axes {'data': 1, "
                                                   "'seq': 1, 'model': 2}) (mesh=, else the params' mesh)")):
        sk.generate(params, CFG, SEGMENT[:2], max_new_tokens=2, context=context, mesh=sk.make_mesh(model=2))

def test_a_shared_context_runs_on_a_mesh_of_one_device():
    """mesh=make_mesh() (one device, as `--mesh model=1` gives) is one device for a context too: one
    prefilled there, or on one device, serves the call (it was refused: 'the context lives on one device
    but the params on a mesh')."""
    params, mesh = _params(CFG), sk.make_mesh()
    document, questions = _tokens(CFG)[:1], SEGMENT[:2]
    _, context = sk.prefill(params, CFG, document)
    want = sk.generate(params, CFG, questions, max_new_tokens=3, context=context)
    _, on_mesh = sk.prefill(params, CFG, document, mesh=mesh)
    for ctx in (context, on_mesh):
        got = sk.generate(params, CFG, questions, max_new_tokens=3, context=ctx, mesh=mesh)
        np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 1, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_decode_time_compression_on_a_mesh_equals_one_device(shape, method):
    """generate(decode_compress=) re-selects every row's live cache every `interval` tokens on the mesh
    (it was refused there): the same sampled tokens and kept positions as on one device."""
    params, tokens, lengths = _params(CFG), _tokens(CFG)[:, :40], np.array([40, 21, 35, 30], np.int32)
    method = sk.SnapKV(window=4, capacity=24, kernel=3) if method == "snapkv" else sk.H2O(capacity=24, window=4)
    run = dict(max_new_tokens=30, decode_compress=method, interval=8, temperature=0.8, seed=3)
    want = sk.generate(params, CFG, tokens, lengths, **run)
    got = sk.generate(sk.shard_params(params, CFG, sk.make_mesh(*shape)), CFG, tokens, lengths, **run)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    for a, b in zip(want.cache.pos, got.cache.pos):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [(1, 1, 4), (2, 1, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("budget", ["layer", "global"])
def test_kvzip_on_a_mesh_equals_one_device(shape, budget):
    """KVzip's reconstruction pass on the data and model axes (it was refused on every mesh): the same
    logits and kept positions as on one device; a seq axis is refused in one line, before tracing."""
    kvzip = sk.KVzip(capacity=24, sinks=2, chunk=16, repeat=[5, 6], resume=[7], suffix=[8], budget=budget,
                     **({"max_per_head": 30} if budget == "global" else {}))
    params, tokens = _params(CFG), _tokens(CFG)[:, :60]
    lengths = np.array([60, 41, 55, 50], np.int32)
    want_logits, want = sk.prefill(params, CFG, tokens, lengths, compress=kvzip)
    logits, got = sk.prefill(params, CFG, tokens, lengths, compress=kvzip, mesh=sk.make_mesh(*shape))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-6)
    _same_cache(want, got)
    with pytest.raises(ValueError, match=re.escape("KVzip's reconstruction pass does not run on a mesh's seq axis "
                                                   "yet (seq=2)")):
        sk.prefill(params, CFG, tokens, lengths, compress=kvzip, mesh=sk.make_mesh(seq=2))


def test_the_scoring_kernel_runs_per_shard():
    """The Pallas window-scores kernel (interpreted on the CPU) inside shard_map, per KV head."""
    mesh = sk.make_mesh(model=4)
    params, tokens, method = _params(CFG), _tokens(CFG), METHODS["snapkv"]
    _, want = sk.prefill(params, CFG, tokens, LENGTHS, compress=method, snap_impl="xla")
    _, got = sk.prefill(params, CFG, tokens, LENGTHS, compress=method, snap_impl="pallas", mesh=mesh)
    _same_cache(want, got)


def _collectives(text: str) -> dict[str, int]:
    ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
    return {op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", text)) for op in ops}


def test_tensor_parallel_layer_has_one_all_reduce_per_block_and_never_gathers_kv():
    mesh = sk.make_mesh(model=4)
    params = sk.shard_params(_params(CFG), CFG, mesh)
    tokens, lengths = np.zeros((2, 96), np.int32), np.array([96, 70], np.int32)
    method = METHODS["snapkv"]
    plan = layer_prefill.make_plan(CFG, 96, method, 32, 8)
    t, lens = sharding.place_rows(mesh, tokens, lengths)
    progs = layer_prefill.programs(params, CFG, t, lens, plan=plan, compress=method, impl="pallas",
                                   attention="xla", ahead_of_time=True, mesh=mesh)
    # The chunk loop's body and its peeled first chunk: attention + MLP, one all-reduce each.
    assert _collectives(progs.layer.as_text()) == {"all-reduce": 4, "all-gather": 0, "all-to-all": 0,
                                                   "collective-permute": 0, "reduce-scatter": 0}
    _, cache = sk.prefill(params, CFG, tokens, lengths, compress=method, max_slots=64)
    step = _decode.lower(params, jnp.zeros((2,), jnp.int32), cache, cfg=CFG).compile().as_text()
    assert _collectives(step)["all-reduce"] == 2 * CFG.num_layers and _collectives(step)["all-gather"] == 0


def test_ring_prefill_passes_kv_around_the_seq_axis():
    mesh = sk.make_mesh(seq=4)
    params = sk.shard_params(_params(CFG), CFG, mesh)
    method = METHODS["snapkv"]
    plan = layer_prefill.make_plan(CFG, 78, method, None, 0, seq=4)
    assert (plan.padded, plan.chunk) == (80, 20)
    t, lens = sharding.place_rows(mesh, _tokens(CFG), LENGTHS)
    progs = layer_prefill.programs(params, CFG, t, lens, plan=plan, compress=method, impl="xla",
                                   attention="xla", ahead_of_time=True, mesh=mesh)
    assert _collectives(progs.layer.as_text())["collective-permute"] >= 2   # K and V blocks


def test_load_places_each_param_on_its_shards(tmp_path):
    directory = str(tmp_path / "ckpt")
    checkpoint.save(directory, CFG, _params(CFG))
    mesh = sk.make_mesh(data=2, model=2)
    _, params, _ = sk.load(directory, mesh=mesh)
    q = params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert q.addressable_shards[0].data.shape == (CFG.hidden_size, CFG.num_heads * CFG.head_dim // 2)
    assert params["layers_1"]["mlp"]["down_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("model", None)
    _, plain, _ = sk.load(directory)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_cli_places_params_on_a_mesh(tmp_path):
    from conversion.cli import main
    from tests.helpers_convert import tiny_hf_model
    hf_dir, out = tmp_path / "hf", tmp_path / "out"
    tiny_hf_model().save_pretrained(hf_dir)
    assert main(["--hf", str(hf_dir), str(out), "--mesh", "model=2"]) == 0
    assert main(["--hf", str(hf_dir), str(tmp_path / "bad"), "--mesh", "model=3"]) == 2
    assert not (tmp_path / "bad").exists()


def test_generate_cli_runs_on_a_mesh(tmp_path, capsys):
    from snapkv_jax.cli import main
    from tests.test_generate_cli import write_tiny_checkpoint
    directory = write_tiny_checkpoint(str(tmp_path / "tiny"))
    prompt = " ".join(f"w{i % 40}" for i in range(60))
    args = ["--checkpoint", directory, "--prompt", prompt, "--raw", "--max-new-tokens", "3", "--window", "4",
            "--capacity", "16", "--kernel", "3"]
    assert main(args + ["--mesh", "seq=2,model=2"]) == 0
    on_mesh = capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out == on_mesh.out                     # the same greedy answer
    assert "kept prompt slots per layer: 16" in on_mesh.err


def test_generate_cli_chats_on_a_mesh(tmp_path, capsys, monkeypatch):
    """--chat on a mesh (it was refused: its turns after the first extend the cache) answers every turn,
    the re-compressing one included, as on one device."""
    from snapkv_jax.cli import main
    from tests.test_generate_cli import write_tiny_checkpoint
    directory = write_tiny_checkpoint(str(tmp_path / "tiny"))
    args = ["--checkpoint", directory, "--chat", "--prompt", " ".join(f"w{i % 40}" for i in range(30)),
            "--max-new-tokens", "3", "--window", "4", "--capacity", "16", "--kernel", "3", "--recompress-at", "24"]
    answers = []
    for extra in (["--mesh", "data=1,model=2"], []):
        monkeypatch.setattr("sys.stdin", io.StringIO("w1 w2 w3\nw4 w5 w6 w7 w8 w9\n"))
        assert main(args + extra) == 0
        answers.append(capsys.readouterr().out)
    assert len(answers[0].splitlines()) == 3 and answers[0] == answers[1]


@pytest.mark.parametrize("mesh, message", [
    (lambda: sk.make_mesh(model=3), "model=3 must divide the model's num_kv_heads=4"),
    (lambda: sk.make_mesh(data=4), "data=4 must divide the batch of 2 rows"),
    (lambda: jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("tensor",)), "mesh axes ['tensor']"),
])
def test_bad_meshes_are_refused_before_tracing(mesh, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sk.prefill(_params(CFG), CFG, np.zeros((2, 8), np.int32), mesh=mesh())


@pytest.mark.parametrize("text, message", [("model=2,model=2", "each once"), ("tensor=2", "bad mesh"),
                                           ("model=x", "bad mesh"), ("data=64", "needs 64 devices")])
def test_parse_mesh_errors(text, message):
    with pytest.raises(ValueError, match=message):
        sk.parse_mesh(text)


@pytest.mark.parametrize("axes", [("seq",), ("seq", "data")])
def test_a_ring_on_a_mesh_without_a_model_axis(one_device, axes):
    """A mesh may name any subset of the axes (sharding.py): ring prefill on one without `model` must not
    all-reduce over it (it raised NameError "unbound axis name: model" from inside jit)."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2 ** len(axes)]).reshape((2,) * len(axes)), axes)
    logits, cache = sk.prefill(_params(CFG), CFG, _tokens(CFG), LENGTHS, compress=METHODS["h2o"],
                               max_slots=100, mesh=mesh)
    want_logits, want = one_device[CFG, "h2o"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-6)
    _same_cache(want, cache)
