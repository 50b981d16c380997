"""The experiments harness (`python -m experiments.run`) on the CPU (the notebook: test_quickstart_notebook.py).

Every study runs once at --scale small (session fixture, one process, so programs compile once) on a
tiny random model that carries the default model's tokenizer (its vocabulary and chat template): the
prompts are the real ones, token for token, and the 2-layer weights make the run 52 s instead of 234 s
(measured alone on the 2-core CI-sized machine, 2026-12-03), most of it the 30-layer model's compiles.
The tests then check the files it wrote. What is checked is what holds for any weights: schemas,
accuracies in [0, 1] inside their Wilson intervals, prompts that fit their length and contain their
answers, resumption, bad input. Which method wins is not checked (at small scale it is noise); the
default model's own answers are checked in test_convert_default_model.py and the notebook's test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import snapkv_jax as sk
from snapkv_jax import checkpoint
from experiments import attention, batching, methods, run, scoring
from experiments.harness import Context, Settings, load_model
from experiments.prompts import Builder, rng_for
from experiments.ruler_tasks import TASKS
from experiments.studies import long_generation, many_questions, passkey, question_position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def model():
    return load_model(None, "float32")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, model):
    """A checkpoint of a tiny random model (2 layers) with the default model's tokenizer and vocabulary."""
    real, _, tokenizer = model
    cfg = sk.ModelConfig.tiny(vocab_size=real.vocab_size, eos_token_id=real.eos_token_id,
                              tie_word_embeddings=real.tie_word_embeddings)
    path = str(tmp_path_factory.mktemp("tiny") / "checkpoint")
    checkpoint.save(path, cfg, sk.init_params(cfg, jax.random.key(0)), tokenizer)
    return path


@pytest.fixture(scope="session")
def small_runs(tmp_path_factory, tiny_checkpoint):
    """results.json of every study at --scale small, by name; all written under one directory."""
    out = tmp_path_factory.mktemp("experiments")
    assert run.main(["all", "--scale", "small", "--out", str(out), "--checkpoint", tiny_checkpoint]) == 0
    return out, {name: json.loads((out / name / "results.json").read_text()) for name in run.STUDIES}


def _accuracy_cells(doc: dict) -> list[dict]:
    """Every dict with an `acc` in a results document (cells and their per-depth / per-task parts)."""
    found = []

    def walk(x):
        if isinstance(x, dict):
            if "acc" in x and "lo" in x:
                found.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc["results"])
    return found


@pytest.mark.parametrize("name", list(run.STUDIES))
def test_every_study_writes_results_with_provenance_and_a_plot(small_runs, name):
    out, docs = small_runs
    doc = docs[name]
    assert doc["experiment"] == name and doc["scale"] == "small" and doc["seed"] == 0
    for field in ("command", "device", "jax", "date", "settings", "checkpoint", "seconds"):
        assert doc[field] not in (None, ""), field
    assert doc["command"].startswith("python -m experiments.run all")
    pngs = [f for f in os.listdir(out / name) if f.endswith(".png")]
    assert pngs
    for f in pngs:
        assert (out / name / f).read_bytes()[:8] == PNG


@pytest.mark.parametrize("name", [n for n in run.STUDIES if n != "observation"])
def test_accuracy_cells_lie_in_their_wilson_intervals(small_runs, name):
    cells = _accuracy_cells(small_runs[1][name])
    assert cells
    for c in cells:
        assert 0 <= c["correct"] <= c["n"]
        if c["n"]:
            assert c["acc"] == pytest.approx(c["correct"] / c["n"])
            assert 0.0 <= c["lo"] <= c["acc"] <= c["hi"] <= 1.0
            assert c["lo"] < c["hi"]


@pytest.mark.parametrize("name", ["passkey", "needle", "ruler", "question_position", "pooling"])
def test_every_cell_scores_every_sample(small_runs, name):
    doc = small_runs[1][name]
    s = doc["settings"]
    for cell in doc["results"]["cells"]:
        per_task = len(s["tasks"]) if name == "ruler" else 1
        assert cell["n"] == len(cell["samples"]) == s["samples"] * per_task
        for sample in cell["samples"]:
            assert sample["score"] == scoring.found(sample["output"], sample["answers"])
            assert sample["tokens"] <= cell["length"] - s["max_new_tokens"]


def test_passkey_runs_each_method_at_each_budget(small_runs):
    doc = small_runs[1]["passkey"]
    s = doc["settings"]
    got = sorted((c["method"], c["budget"] or 0, c["length"]) for c in doc["results"]["cells"])
    want = sorted((m, c or 0, n) for n in s["lengths"] for m, c in methods.configs(s["methods"], s["budgets"], n))
    assert got == want


def test_observation_hit_rates_are_shares_per_layer_and_offset(small_runs, tiny_checkpoint):
    cfg = checkpoint.load(tiny_checkpoint)[0]
    (cell,) = small_runs[1]["observation"]["results"]["cells"]
    hits = np.array(cell["hit_rate"])
    assert hits.shape == (cfg.num_layers, len(cell["offsets"]))
    assert np.all((hits >= 0) & (hits <= 1))
    assert np.array(cell["hit_rate_per_head"]).shape == (cfg.num_layers, cfg.num_heads, len(cell["offsets"]))
    assert 0 < cell["chance"] < 1 and cell["generated"] >= 16


def test_rerun_loads_finished_cells_without_generating(small_runs, monkeypatch):
    out, docs = small_runs

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(batching, "generate", refuse)
    monkeypatch.setattr(batching, "generate_after", refuse)
    assert run.main(["passkey", "--scale", "small", "--out", str(out / "passkey"), "--checkpoint",
                     docs["passkey"]["checkpoint"]]) == 0
    again = json.loads((out / "passkey" / "results.json").read_text())
    assert again["results"] == docs["passkey"]["results"]


def test_adding_a_method_computes_only_its_cells(small_runs, tiny_checkpoint, tmp_path, monkeypatch):
    out, _ = small_runs
    target = tmp_path / "passkey"
    os.makedirs(target / "cells")
    for f in os.listdir(out / "passkey" / "cells"):
        (target / "cells" / f).write_bytes((out / "passkey" / "cells" / f).read_bytes())
    calls = []
    real = batching.generate
    monkeypatch.setattr(batching, "generate", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert run.main(["passkey", "--scale", "small", "--out", str(target), "--methods", "full", "random",
                     "--checkpoint", tiny_checkpoint]) == 0
    assert [type(m).__name__ for m in calls] == ["RandomKV"]


@pytest.mark.parametrize("argv", [
    ["nosuch", "--out", "x"],
    ["passkey", "--out", "x", "--methods", "snapkv", "nosuch"],
    ["passkey", "--out", "x", "--budgets", "16"],
    ["passkey", "--out", "x", "--samples", "0"],
    ["passkey", "--out", "x", "--lengths", "0"],
    ["all", "--out", "x", "--lengths", "512"],
    ["passkey", "--out", "x", "--scale", "huge"],
    ["pooling", "--out", "x", "--methods", "snapkv"],
    ["all", "--out", "x", "--samples", "3"],
    ["needle", "--out", "x", "--checkpoint", "/no/such/dir"],
    ["passkey"],
    ["passkey", "--out", "file.txt"],
    ["passkey", "--out", "file.txt/sub"],
    ["passkey", "--out", "x", "--seed", "-1"],
    ["passkey", "--out", "x", "--seed", str(2**32)],
    ["passkey", "--out", "x", "--lengths", "10"],  # found once the prompts are built: too short for them
    # a repeated value made two cells of one key: a ValueError traceback from inside the study, exit 1
    ["passkey", "--out", "x", "--methods", "snapkv", "snapkv"],
    ["passkey", "--out", "x", "--budgets", "64", "64"],
    ["passkey", "--out", "x", "--lengths", "256", "256"],
])
def test_bad_input_prints_one_line_and_returns_2(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a directory")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("experiments.run: error: ") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "x")


def test_studies_without_methods_check_budgets_against_their_own_windows():
    """pooling and observation use a 16-token window at small scale, not the methods' 32."""
    for name in ("pooling", "observation"):
        [(_, settings)] = run.settings_from([name, "--out", "x", "--budgets", "24"])
        assert settings.scale.budgets == (24,)
    with pytest.raises(ValueError, match="budget 16 must exceed the largest observation window"):
        run.settings_from(["pooling", "--out", "x", "--budgets", "16"])


def test_lengths_flag_replaces_the_scales_context_lengths():
    [(study, settings)] = run.settings_from(["passkey", "--scale", "full", "--out", "x", "--lengths", "2048", "4096"])
    assert study is passkey and settings.scale.lengths == (2048, 4096)
    assert settings.scale.budgets == passkey.SCALES["full"].budgets


def test_bad_input_exits_with_status_2():
    proc = subprocess.run([sys.executable, "-m", "experiments.run", "passkey", "--out", "x", "--budgets", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("experiments.run: error: budget 8")


def test_methods_build_each_named_method_at_its_budget(model):
    for name in methods.KNOWN:
        m = methods.build(name, 256, seed=3, tokenizer=model[2])
        assert (m is None) == (name == "full")
        if m is not None:
            assert m.capacity == 256
    assert methods.build("h2o_mean", 256).normalize and not methods.build("h2o", 256).normalize
    with pytest.raises(ValueError, match="'kvzip' needs the tokenizer"):
        methods.build("kvzip", 256)


def test_results_files_get_the_mode_of_a_plain_write(tmp_path):
    """write_atomic's temporary file came from mkstemp, 0600, so results.json, cells and plots could be
    read by their owner alone; a plain open() gives 0666 less the umask."""
    from experiments.harness import write_json
    old = os.umask(0o022)
    try:
        write_json(str(tmp_path / "results.json"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "results.json").st_mode & 0o777 == 0o644


def test_wilson_interval_matches_known_values():
    assert scoring.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert scoring.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert scoring.wilson(50, 50)[1] == 1.0
    with pytest.raises(ValueError):
        scoring.wilson(3, 2)


def test_batches_have_fixed_rows_one_bucket_each_and_cover_every_prompt():
    prompts = [[1] * n for n in (5, 40, 33, 7, 100, 31, 64)]
    seen = []
    for chunk, tokens, lengths in batching.batches(prompts, rows=2):
        assert tokens.shape[0] == lengths.shape[0] == 2
        assert all(len(prompts[i]) <= tokens.shape[1] for i in chunk)
        assert (tokens[np.arange(tokens.shape[1])[None] >= lengths[:, None]] == 0).all()
        seen += chunk
    assert sorted(seen) == list(range(len(prompts)))


def _hit_rates_oracle(q, k, lengths, window, offsets, generated, top):
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, h, len(offsets)))
    for r in range(b):
        L = lengths[r]
        for head in range(h):
            logits = q[r, :, head] @ k[r, :, head // g].T / np.sqrt(d)         # [T, T]
            logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            cand = L - window
            best = set(np.argsort(-p[L:L + generated, :cand].sum(0), kind="stable")[:top])
            for j, o in enumerate(offsets):
                win = p[L - o - window:L - o, :cand].sum(0)
                out[r, head, j] = len(best & set(np.argsort(-win, kind="stable")[:top])) / top
    return out


def test_hit_rates_match_a_numpy_oracle():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 40, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 40, 2, 8)).astype(np.float32)
    lengths = np.array([32, 28], np.int32)
    got = attention.hit_rates(q, k, lengths, window=4, offsets=(0, 3, 9), generated=6, top=5)
    want = _hit_rates_oracle(q, k, lengths, 4, (0, 3, 9), 6, 5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_every_prompt_fits_its_target_and_holds_its_answers(model):
    tok = model[2]
    b = Builder(tok)
    made = [TASKS[t](b, rng_for(1, t), 300) for t in TASKS if t not in ("cwe", "fwe")]
    made.append(passkey.prompt(b, 1, 300, 8, 0))
    made += list(question_position.prompts_for(b, 1, 300, 8, 0).values())
    for p in made:
        assert len(p.ids) <= 300
        text = tok.decode(p.ids)
        assert all(a in text for a in p.answers), (p.answers, text)
    for t in ("cwe", "fwe"):  # aggregation tasks: the answers are the most frequent words of the prompt
        p = TASKS[t](b, rng_for(1, t), 300)
        assert len(p.ids) <= 300 and all(p.answers)


def test_chat_frame_wraps_content_in_the_template_and_plain_frame_does_not(model):
    tok = model[2]
    want = tok.apply_chat_template([{"role": "user", "content": "Hello there."}], add_generation_prompt=True,
                                   tokenize=False) + "Sure"
    chat = Builder(tok, chat=True)
    assert tok.decode(chat.frame(chat.ids("Hello there."), "Sure")) == want
    plain = Builder(tok)
    assert tok.decode(plain.frame(plain.ids("Hello there."), "Sure"), skip_special_tokens=True) == "Hello there. Sure"


def test_question_agnostic_split_ends_before_the_question(model):
    tok = model[2]
    asked = question_position.prompts_for(Builder(tok), 2, 300, 8, 0)
    agnostic = asked["agnostic"]
    prefilled, fed = tok.decode(agnostic.ids[:agnostic.split]), tok.decode(agnostic.ids[agnostic.split:])
    assert prefilled.endswith(question_position.GENERIC)
    assert fed.startswith("\nWhat is the special magic number for " + agnostic.meta["key"])
    assert asked["after"].split is None and asked["before"].split is None


def test_needle_depth_places_the_needle(model):
    tok = model[2]
    b = Builder(tok)
    for depth, lo, hi in ((0.0, 0.0, 0.25), (0.5, 0.35, 0.65), (1.0, 0.75, 1.0)):
        p = TASKS["niah_single"](b, rng_for(3, depth), 600, depth)
        needle = b.ids(" One of the special magic numbers for")
        starts = [i for i in range(len(p.ids)) if p.ids[i:i + len(needle)] == needle]
        assert len(starts) == 1 and lo <= starts[0] / len(p.ids) <= hi


def test_generate_after_with_full_cache_equals_generating_from_the_whole_prompt():
    """Feeding a suffix token by token into the full cache is prefilling it: same greedy tokens, on a
    tiny random model (the equivalence is the batching's, not the weights'), ragged prompts and suffixes."""
    cfg = sk.ModelConfig.tiny()
    params = sk.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (40, 57, 33)]
    cut = [9, 4, 12]
    whole = batching.generate(cfg, params, prompts, None, max_new_tokens=6, rows=4, eos_id=None)
    split = batching.generate_after(cfg, params, [p[:-c] for p, c in zip(prompts, cut)],
                                    [p[-c:] for p, c in zip(prompts, cut)], None, max_new_tokens=6, rows=4,
                                    eos_id=None)
    assert split == whole and all(len(t) == 6 for t in whole)


def test_many_questions_prefills_each_document_once_and_asks_every_question(small_runs):
    doc = small_runs[1]["many_questions"]
    cells = {(c["approach"], c["method"]): c for c in doc["results"]["cells"]}
    facts, samples = doc["results"]["facts"], doc["settings"]["samples"]
    assert set(cells) == {("once", "full"), ("once", "snapkv"), ("per_question", "snapkv")}
    for c in cells.values():
        assert c["n"] == len(c["samples"]) == facts * samples
        assert sorted(s["question"] for s in c["samples"]) == sorted(list(range(facts)) * samples)
    once, per = cells[("once", "snapkv")], cells[("per_question", "snapkv")]
    # per question, the document is prefilled `facts` times; once, one time plus the questions
    doc_tokens = per["prefill_tokens"] - once["prefill_tokens"]
    assert doc_tokens > 0 and per["prefill_flops"] > 2 * once["prefill_flops"]


def test_many_questions_documents_of_a_cell_share_one_prefill_shape(model, monkeypatch):
    """Each document is padded to its bucket before prefill, so a cell compiles one prefill and one
    shared-context program however many documents it has (unpadded, every document compiled anew).
    A tiny random model with the real vocabulary keeps it to seconds."""
    tok = model[2]
    cfg = sk.ModelConfig.tiny(vocab_size=model[0].vocab_size)
    scale = many_questions.SCALES["small"]
    ctx = Context(Settings(name=many_questions.NAME, out="unused", scale_name="small", scale=scale, seed=0,
                           checkpoint=None, argv=()))
    ctx.__dict__["model"] = (cfg, sk.init_params(cfg, jax.random.key(0)), tok)
    builder = Builder(tok)
    docs = [many_questions.document(builder, 0, 320, scale.max_new_tokens, i) for i in range(3)]
    assert len({d[0].split for d in docs}) > 1  # the documents differ in length
    shapes = []
    real = sk.prefill
    monkeypatch.setattr(sk, "prefill", lambda params, cfg, tokens, *a, **k: shapes.append(np.shape(tokens))
                        or real(params, cfg, tokens, *a, **k))
    cell = many_questions.once_cell(ctx, "k", docs, "snapkv", 64, approach="once", length=320)
    result = cell.compute(lambda n: None)
    assert len(shapes) == 3 and len(set(shapes)) == 1
    assert result["n"] == 3 * many_questions.FACTS and len(result["doc_seconds"]) == 3
    assert result["warm_doc_s"] == pytest.approx(float(np.median(result["doc_seconds"][1:])), abs=1e-3)


def test_long_generation_keeps_decode_cells_within_their_live_slot_budget(small_runs):
    doc = small_runs[1]["long_generation"]
    s, res = doc["settings"], doc["results"]
    cells = res["cells"]
    got = sorted((c["method"], c["budget"] or 0, c["length"]) for c in cells)
    want = sorted((m, b or 0, n) for n in s["lengths"] for m, b in methods.configs(s["methods"], s["budgets"], n))
    assert got == want
    for c in cells:
        assert c["n"] == len(c["samples"]) == s["samples"]
        for sample in c["samples"]:
            assert sample["items"] == long_generation.recited(sample["output"], sample["answers"])
            assert sample["score"] == pytest.approx(sum(sample["items"]) / s["items"])
            assert sample["tokens"] <= c["length"] - s["max_new_tokens"]
        if c["method"] == "full":  # the uncompressed cache holds prompt + answer, past every budget
            assert not c["decode"] and c["live_slots"] > max(s["budgets"])
            assert all(x["live_slots"] == x["tokens"] + x["generated"] - 1 for x in c["samples"])
        else:
            assert c["decode"] and c["capacity"] == c["budget"] - s["interval"]
            assert c["live_slots"] <= c["cache_slots"] <= c["budget"]
            # the answer outlasted an interval and would have overflowed the budget uncompressed
            assert all(x["generated"] > s["interval"] and x["tokens"] + x["generated"] - 1 > c["budget"]
                       for x in c["samples"])


def test_long_generation_reports_accuracy_per_item_of_the_answer(small_runs):
    res = small_runs[1]["long_generation"]["results"]
    items = res["items"]
    assert len(res["answer_offsets"]) == items and res["answer_offsets"] == sorted(set(res["answer_offsets"]))
    for c in res["cells"]:
        assert len(c["by_item"]) == items
        for k, item in enumerate(c["by_item"]):
            assert item["n"] == c["n"] and item["correct"] == sum(x["items"][k] for x in c["samples"])
        assert c["partial"] == pytest.approx(np.mean([x["score"] for x in c["samples"]]))
        assert c["correct"] == sum(all(x["items"]) for x in c["samples"])
    table = (small_runs[0] / "long_generation" / "long_generation_table.md").read_text()
    assert table.count("\n| ") == len(res["cells"]) + 1 and f"item {items} |" in table


def test_long_generation_prompt_holds_the_values_in_document_order(model):
    tok = model[2]
    b = Builder(tok)
    for i in range(3):
        p = long_generation.prompt(b, 1, 700, 96, 8, i)
        text = tok.decode(p.ids)
        assert len(p.ids) <= 700 - 96 and text.endswith(long_generation.ANSWER_PREFIX)
        where = [text.index(f"is: {v}.") for v in p.answers]
        assert where == sorted(where) and len(set(p.answers)) == 8


def test_recited_scores_the_kth_listed_number_against_the_kth_value():
    values = ("1234567", "7654321", "5550000")
    assert long_generation.recited(" 1234567\n2. 7654321\n3. 5550000\n4. 1234567", values) == [1.0, 1.0, 1.0]
    assert long_generation.recited(" 1234567\n2. 5550000\n3. 7654321", values) == [1.0, 0.0, 0.0]
    assert long_generation.recited(" 7654321\n2. 12\n3. 5550000", values) == [0.0, 0.0, 0.0]
    assert long_generation.recited(" 1. 2. 3.", values) == [0.0, 0.0, 0.0]


def test_long_generation_capacity_rule_and_refused_scales():
    full = long_generation.SCALES["full"]
    long_generation.validate(full)
    assert long_generation.capacity(full, 256, decode=True) == 256 - full.interval
    assert long_generation.capacity(full, 256, decode=False) == 256 - (full.max_new_tokens - 1)
    for bad, message in ((dict(interval=16), "interval 16"), (dict(max_new_tokens=32), "must exceed interval"),
                         (dict(budgets=(64,)), "budget 64 leaves capacity 32"),
                         (dict(budgets=(100,)), "budget 100 leaves capacity 5"), (dict(items=100), "items"),
                         (dict(prefill_only=("full",)), "'full' compresses nothing")):
        with pytest.raises(ValueError, match=message):
            long_generation.validate(dataclasses.replace(full, **bad))
