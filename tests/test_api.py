"""The Python API (loaq.api), recipes and the method registry on a tiny model directory.

The API and the CLI must write bit-identical checkpoints for one recipe, a finished run's ``loaq.json``
must reproduce its codes, and every refusal must happen before anything is written.
"""

import dataclasses
import json
import os

import pytest
import torch
from loaq.shards import quantized_tensors

import loaq
from loaq.cli import main
from loaq.config import Calibration, Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.methods import METHODS
from loaq.recipe import load_recipe
from tests.tiny import TEXT

CAL = dict(nsamples=4, seqlen=32)


def codes(path) -> dict:
    return quantized_tensors(str(path))


def assert_same_codes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 3 * 14
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def cli(model_dir, out, *extra):
    return main(["-q", "quantize", "--model", model_dir, "--batch-size", "2", "--out", str(out), *extra])


def test_api_and_cli_write_the_same_checkpoint(model_dir, calib, tmp_path):
    cfg = QuantConfig(spec=GridSpec(3, 32), method=Method("loaq", alpha=0.5, beta=0.25))
    run = loaq.quantize(model_dir, cfg, Calibration(calib, **CAL), out=str(tmp_path / "api"), batch_size=2,
                        progress=False)
    assert run.out == str(tmp_path / "api") and run.timings["quantize"] > 0 and len(run.results) == 14
    assert cli(model_dir, tmp_path / "cli", "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--bits", "3",
               "--group-size", "32", "--alpha", "0.5", "--beta", "0.25") == 0
    assert_same_codes(codes(tmp_path / "api"), codes(tmp_path / "cli"))
    a, b = (json.load(open(tmp_path / d / "loaq.json")) for d in ("api", "cli"))
    assert a["config"] == b["config"] == cfg.to_dict() and a["calibration"] == b["calibration"]
    # the in-memory model is the checkpoint: its weights equal the dequantized codes loaq.load reads back
    m = loaq.load(str(tmp_path / "api"))
    assert m.kind == "native" and m.label == {"method": "loaq", "bits": 3, "group": 32}
    for name in run.results:
        assert torch.equal(m.model.get_submodule(name).weight, run.model.get_submodule(name).weight), name


def test_finished_run_is_a_recipe_that_reproduces_its_codes(model_dir, calib, tmp_path):
    first = tmp_path / "first"
    assert cli(model_dir, first, "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--method", "gptaq",
               "--bits", "2", "--alpha", "0.5", "--seed", "3", "--rotate", "hadamard", "--rotate-seed", "2") == 0
    # the CLI with only --recipe (model, calibration, seed and rotation all come from loaq.json)
    assert main(["-q", "quantize", "--recipe", str(first / "loaq.json"), "--batch-size", "2",
                 "--out", str(tmp_path / "again")]) == 0
    assert_same_codes(codes(first), codes(tmp_path / "again"))
    # the API with the run directory as config
    run = loaq.quantize(config=str(first), out=str(tmp_path / "api"), batch_size=2, progress=False)
    assert_same_codes(codes(first), codes(tmp_path / "api"))
    assert run.recipe.config.rotation.seed == 2 and run.recipe.calibration.seed == 3
    # a flag overrides the recipe: other codes, the rest of the recipe kept
    assert main(["-q", "quantize", "--recipe", str(first), "--alpha", "0.0", "--batch-size", "2",
                 "--out", str(tmp_path / "a0")]) == 0
    meta = json.load(open(tmp_path / "a0" / "loaq.json"))
    assert meta["config"]["method"] == {**json.load(open(first / "loaq.json"))["config"]["method"], "alpha": 0.0}
    assert meta["calibration"]["hash"] == json.load(open(first / "loaq.json"))["calibration"]["hash"]
    assert not all(torch.equal(v, codes(first)[k]) for k, v in codes(tmp_path / "a0").items())


def test_yaml_recipe_with_flag_overrides(model_dir, calib, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\nspec: {{bits: 4, group_size: 32, symmetric: true}}\n"
                      f"method: {{name: loaq, alpha: 0.5, beta: 0.1}}\n"
                      f"calibration: {{source: {calib}, nsamples: 4, seqlen: 32}}\n")
    rec = load_recipe(str(recipe), {"spec": {"bits": 3}, "method": {"beta": None}})
    assert rec.config.spec == GridSpec(3, 32, True) and rec.config.method.alpha == 0.5 and rec.config.method.beta == 0.1
    assert rec.model == model_dir and rec.calibration == Calibration(calib, **CAL)
    # another method drops the recipe's method settings (they were LoaQ's)
    assert load_recipe(str(recipe), {"method": {"name": "gptq"}}).config.method == Method("gptq")
    assert main(["-q", "quantize", "--recipe", str(recipe), "--bits", "3", "--batch-size", "2",
                 "--out", str(tmp_path / "y")]) == 0
    run = loaq.quantize(config=dataclasses.replace(rec), out=str(tmp_path / "y2"), batch_size=2, progress=False)
    assert run.meta["config"]["spec"] == {"bits": 3, "group_size": 32, "symmetric": True, "init": "minmax"}
    assert_same_codes(codes(tmp_path / "y"), codes(tmp_path / "y2"))


@pytest.mark.parametrize("flags, words", [
    (["--method", "gptq", "--beta", "0.5"], "--beta 0.5 has no meaning for method gptq"),
    (["--method", "lloa", "--no-rescale"], "--no-rescale has no meaning for method lloa"),
    (["--method", "qronos", "--alpha", "0.3"], "--alpha 0.3 has no meaning for method qronos"),
    (["--bits", "4", "--group-size", "32", "--act-bits", "4"], "--act-bits 4 needs 4-bit per-channel weights"),
    (["--shat", "alg", "--no-rescale"], "--shat alg changes NOA's ŝ, which --no-rescale switches off"),
    (["--beta", "0.2", "--no-soa"], "--beta 0.2 weights the SOA term, which --no-soa switches off"),
    (["--act-sym"], "--act-sym sets the grid of quantized activations"),
    (["--rotate-seed", "3"], "--rotate-seed seeds the Hadamard rotation"),
    (["--group-size", "48"], "--group-size 48 does not divide input width(s)"),
])
def test_meaningless_settings_are_refused_before_anything_is_written(model_dir, calib, tmp_path, capsys, flags, words):
    out = tmp_path / "x"
    rc = cli(model_dir, out, "--calib", calib, *flags)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and words in err and "\n" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, words", [
    ("spec: {bits: 3, groups: 4}\n", "recipe section 'spec' has unknown field(s) groups"),
    ("bits: 3\n", "unknown field(s) bits"),
    ("method: {name: awq}\n", "unknown method 'awq'"),
    ("spec: [3]\n", "recipe field 'spec' must be a mapping"),
    ("spec: {bits: 3\n", "does not parse"),
])
def test_bad_recipes_get_one_line(model_dir, tmp_path, capsys, text, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    rc = cli(model_dir, tmp_path / "x", "--recipe", str(recipe))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and "\n" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["r.yaml"]


def test_unknown_method_is_refused_by_the_registry():
    with pytest.raises(LoaQError, match="unknown method 'lloa2'; choose one of rtn, gptq, gptaq, qronos, lloa, loaq"):
        Method("lloa2")


def test_every_method_runs_through_the_registry(model_dir, calib, monkeypatch):
    """Each method's rule is what runs (a spy sees its solve called on every group but for RTN), and the
    registry's equivalences hold bit for bit: LLOA at α = 0 and LoaQ at α = β = 0 without NOA are GPTQ,
    while LoaQ at α = β = 0 with NOA is not (its W_out H is built from ŝX̂)."""
    import loaq.methods as methods

    model = loaq.load(model_dir)
    windows = loaq.api.calibration_windows(model.tokenizer, Calibration(calib, **CAL))
    calls = []
    for name, rule in list(METHODS.items()):
        if rule.solve is not None:
            def spy(*args, _solve=rule.solve, _name=name):
                calls.append(_name)
                return _solve(*args)
            monkeypatch.setitem(methods.METHODS, name, dataclasses.replace(rule, solve=spy))

    def run(**method):
        import copy

        r = loaq.quantize(copy.deepcopy(model.model), QuantConfig(spec=GridSpec(3), method=Method(**method)), windows,
                          tokenizer=model.tokenizer, batch_size=2, progress=False)
        return {k: v.codes for k, v in r.results.items()}

    fixed = {"loaq": dict(alpha=0.25, beta=0.0)}  # fixed, so the spy sees the run's solves, not auto's search
    got = {m: run(name=m, **fixed.get(m, {})) for m in METHODS}
    assert calls == [m for m in METHODS if m != "rtn" for _ in range(2 * 4)]  # 2 layers x 4 groups each
    assert len({tuple(c.sum().item() for c in got[m].values()) for m in METHODS}) == len(METHODS)
    for same in (run(name="lloa", alpha=0.0), run(name="loaq", alpha=0.0, beta=0.0, rescale=False)):
        assert all(torch.equal(same[k], got["gptq"][k]) for k in same)
    noa = run(name="loaq", alpha=0.0, beta=0.0)
    assert all(torch.equal(noa[k], got["gptq"][k]) for k in noa if k.endswith(("q_proj", "k_proj", "v_proj")) and ".0." in k)
    assert not all(torch.equal(noa[k], got["gptq"][k]) for k in noa if k.endswith("o_proj"))


def test_loaded_model_and_token_windows_give_the_path_run(model_dir, calib, tmp_path):
    cfg = QuantConfig(spec=GridSpec(4, 32), method=Method("qronos"))
    by_path = loaq.quantize(model_dir, cfg, Calibration(calib, **CAL), batch_size=2, progress=False)
    m = loaq.load(model_dir)
    windows = loaq.api.calibration_windows(m.tokenizer, Calibration(calib, **CAL))
    by_module = loaq.quantize(m.model, cfg, windows, tokenizer=m.tokenizer, batch_size=2, progress=False)
    assert by_module.model is m.model and by_path.out is None
    for k, r in by_path.results.items():
        assert torch.equal(r.codes, by_module.results[k].codes), k
    with pytest.raises(LoaQError, match="needs tokenizer="):
        loaq.quantize(m.model, cfg, windows)
    with pytest.raises(LoaQError, match="export and resume need out=DIR"):
        loaq.quantize(model_dir, cfg, export=str(tmp_path / "ct"))


def test_quantize_exports_and_load_runs_the_export(model_dir, calib, tmp_path):
    run = loaq.quantize(model_dir, QuantConfig(spec=GridSpec(4, 32), method=Method("gptq")), Calibration(calib, **CAL),
                        out=str(tmp_path / "n"), export=str(tmp_path / "ct"), export_dtype="float32",
                        evaluation=loaq.Evaluation(calib, 256, 32), batch_size=2, progress=False)
    native, export = loaq.load(str(tmp_path / "n")), loaq.load(str(tmp_path / "ct"))
    assert (native.kind, export.kind) == ("native", "export") and export.label == {"method": "-", "bits": 4, "group": 32}
    ids = torch.tensor([[1, 5, 9, 33, 2, 7, 100, 4]])
    with torch.no_grad():
        assert torch.equal(native.model(ids).logits, export.model(ids).logits)
    ev = loaq.evaluate(export, evaluation=loaq.Evaluation(calib, 256, 32), batch_size=2)
    assert ev["ppl"] == pytest.approx(run.ppl, rel=1e-6) and ev["eval_tokens"] == 256
    assert run.fp_ppl == pytest.approx(loaq.evaluate(model_dir, evaluation=loaq.Evaluation(calib, 256, 32))["ppl"], rel=1e-6)
    assert run.fp_ppl != run.ppl


def test_chat_and_dataset_calibration_through_the_cli(model_dir, tmp_path):
    """``--calib`` with chat messages (rendered by the chat template) and a saved dataset with
    ``--calib-split``/``--calib-field`` give the codes of the API run on the same source."""
    from datasets import Dataset, DatasetDict

    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    chat_dir = tmp_path / "chat_model"
    import shutil

    shutil.copytree(model_dir, chat_dir)
    tok.save_pretrained(chat_dir)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": TEXT[i * 40:(i + 1) * 400]},
                                                        {"role": "assistant", "content": TEXT[:300]}]})
                               for i in range(4)) + "\n")
    assert cli(str(chat_dir), tmp_path / "c", "--calib", str(chats), "--nsamples", "4", "--seqlen", "32") == 0
    run = loaq.quantize(str(chat_dir), None, Calibration(str(chats), **CAL), batch_size=2, progress=False)
    assert json.load(open(tmp_path / "c" / "loaq.json"))["calibration"]["source"] == str(chats)
    c = codes(tmp_path / "c")
    assert all(torch.equal(c[f"{k}.codes"], r.codes) for k, r in run.results.items())
    ds = tmp_path / "ds"
    DatasetDict({"validation": Dataset.from_dict({"body": [TEXT] * 3}), "train": Dataset.from_dict({"body": ["x"]})}
                ).save_to_disk(str(ds))
    assert cli(model_dir, tmp_path / "d", "--calib", str(ds), "--calib-split", "validation", "--calib-field", "body",
               "--nsamples", "4", "--seqlen", "32") == 0
    meta = json.load(open(tmp_path / "d" / "loaq.json"))["calibration"]
    assert (meta["split"], meta["field"]) == ("validation", "body")
    run = loaq.quantize(model_dir, None, Calibration(str(ds), split="validation", field="body", **CAL), batch_size=2,
                        progress=False)
    d = codes(tmp_path / "d")
    assert all(torch.equal(d[f"{k}.codes"], r.codes) for k, r in run.results.items())


def test_offline_hub_id_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    rc = main(["-q", "quantize", "--model", "nobody/not-cached-model", "--out", str(tmp_path / "o"),
               "--export", str(tmp_path / "ct")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "HF_HUB_OFFLINE" in err and "nobody/not-cached-model" in err and "\n" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "ct").exists() and not (tmp_path / "o.partial").exists()


def test_a_recipe_dict_is_read_as_a_recipe_file_is(model_dir, calib):
    """``quantize(config=dict)`` takes the sections a recipe file holds, and refuses what a file would refuse."""
    with pytest.raises(LoaQError, match=r"recipe has unknown field\(s\) bits"):
        loaq.quantize(model_dir, {"bits": 3})
    run = loaq.quantize(model_dir, {"spec": {"bits": 4, "group_size": 32}, "method": {"name": "gptq"},
                                    "calibration": {"source": calib, **CAL}}, batch_size=2, progress=False)
    assert run.recipe.config == QuantConfig(spec=GridSpec(4, 32), method=Method("gptq"))
    assert run.recipe.calibration == Calibration(calib, **CAL)
