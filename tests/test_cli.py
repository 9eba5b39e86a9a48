"""The `loaq` command line end to end on a tiny model directory, and its refusals."""

import json
import os

import pytest
import torch

from loaq.cli import main


def quantize(model_dir, calib, out, *extra):
    return main(["-q", "quantize", "--model", model_dir, "--calib", calib, "--nsamples", "4", "--seqlen", "32",
                 "--batch-size", "2", "--out", str(out), *extra])


def one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_quantize_eval_and_checkpoint_contents(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize(model_dir, calib, out, "--method", "loaq", "--bits", "4", "--group-size", "32",
                    "--eval", "--eval-text", calib, "--eval-tokens", "256", "--eval-seqlen", "32") == 0
    printed = capsys.readouterr().out
    assert "quantized  loaq" in printed and "fp32" in printed
    meta = json.load(open(out / "loaq.json"))
    assert meta["config"]["method"]["name"] == "loaq" and meta["config"]["spec"]["group_size"] == 32
    assert len(meta["quantized"]) == 14
    # the recorded perplexities equal GPTQ's protocol computed here in plain torch on the same 8 windows of 32
    assert meta["eval"]["fp_ppl"] == pytest.approx(_reference_ppl(model_dir, calib), rel=1e-5)
    assert meta["eval"]["ppl"] == pytest.approx(_reference_ppl(str(out), calib), rel=1e-5)
    assert meta["eval"]["ppl"] != meta["eval"]["fp_ppl"] and meta["eval"]["tokens"] == 256
    assert {"config.json", "weights", "tokenizer.json"} <= set(os.listdir(out))
    assert not os.path.exists(f"{out}.partial")
    assert main(["-q", "eval", "--quantized", str(out), "--eval-text", calib, "--eval-tokens", "256",
                 "--eval-seqlen", "32", "--json", str(tmp_path / "e.json")]) == 0
    assert json.load(open(tmp_path / "e.json"))["ppl"] == pytest.approx(meta["eval"]["ppl"], rel=1e-6)


def _reference_ppl(path: str, text_file: str) -> float:
    """exp(mean next-token NLL) over the first 256 tokens in windows of 32, each window scored alone."""
    from transformers import AutoTokenizer

    if os.path.isfile(os.path.join(path, "loaq.json")):
        from loaq.checkpoint import load_native

        model, tok, _ = load_native(path)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor(tok(open(text_file).read(), add_special_tokens=False)["input_ids"][:256]).reshape(8, 32)
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(torch.exp(nll))


def test_resume_flag_finishes_an_interrupted_run(model_dir, calib, tmp_path, monkeypatch):
    import loaq.checkpoint as ck

    real = ck.LayerStore.save_layer

    def die_after_first(self, i, res, streams, *extra):
        real(self, i, res, streams, *extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.LayerStore, "save_layer", die_after_first)
    assert quantize(model_dir, calib, tmp_path / "r", "--method", "gptq") == 130
    monkeypatch.setattr(ck.LayerStore, "save_layer", real)
    assert os.path.exists(tmp_path / "r.partial") and not os.path.exists(tmp_path / "r")
    assert quantize(model_dir, calib, tmp_path / "r", "--method", "gptq") == 2  # refuses without --resume
    assert quantize(model_dir, calib, tmp_path / "r", "--method", "gptq", "--resume") == 0
    assert quantize(model_dir, calib, tmp_path / "full", "--method", "gptq") == 0
    from loaq.shards import quantized_tensors

    a, b = quantized_tensors(str(tmp_path / "r")), quantized_tensors(str(tmp_path / "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rotated_neuqi_w4a4_checkpoint_evaluates_as_quantized(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "h"
    assert quantize(model_dir, calib, out, "--method", "loaq", "--bits", "4", "--act-bits", "4", "--rotate", "hadamard",
                    "--rotate-seed", "5", "--init", "neuqi", "--eval", "--eval-text", calib, "--eval-tokens", "256",
                    "--eval-seqlen", "32") == 0
    meta = json.load(open(out / "loaq.json"))
    assert meta["activations"] == {"bits": 4, "symmetric": False} and meta["rotation"]["seed"] == 5
    assert meta["config"]["spec"]["init"] == "neuqi" and meta["config"]["rotation"]["kind"] == "hadamard"
    assert os.path.exists(out / "rotation.safetensors")
    assert main(["-q", "eval", "--quantized", str(out), "--eval-text", calib, "--eval-tokens", "256",
                 "--eval-seqlen", "32", "--json", str(tmp_path / "e.json")]) == 0
    assert json.load(open(tmp_path / "e.json"))["ppl"] == pytest.approx(meta["eval"]["ppl"], rel=1e-6)
    err = one_line_error(capsys, quantize(model_dir, calib, tmp_path / "x", "--bits", "3", "--act-bits", "4"))
    assert "--act-bits 4 needs 4-bit per-channel weights" in err


@pytest.mark.parametrize("case", ["missing", "arch", "bits", "group", "empty", "exists"])
def test_bad_inputs_give_one_line_and_leave_nothing(case, model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    args = dict(model=model_dir, calib=calib)
    extra = []
    if case == "missing":
        args["model"] = str(tmp_path / "nope")
    elif case == "arch":
        bad = tmp_path / "gpt2"
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
        args["model"] = str(bad)
    elif case == "bits":
        extra = ["--bits", "5"]
    elif case == "group":
        extra = ["--group-size", "48"]  # does not divide 64 or 128
    elif case == "empty":
        args["calib"] = str(tmp_path / "empty.txt")
        open(args["calib"], "w").close()
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
    before = set(os.listdir(tmp_path))
    err = one_line_error(capsys, quantize(args["model"], args["calib"], out, *extra))
    expect = {"missing": "does not exist", "arch": "supported: LlamaForCausalLM", "bits": "--bits 5",
              "group": "valid group sizes: 16, 32, 64", "empty": "is empty", "exists": "--force"}[case]
    assert expect in err, err
    assert set(os.listdir(tmp_path)) == before
    if case == "exists":
        assert os.listdir(out) == ["keep"]


def test_search_picks_the_best_held_out_point(model_dir, calib, tmp_path):
    out = tmp_path / "s.json"
    assert main(["-q", "search", "--model", model_dir, "--calib", calib, "--method", "loaq", "--bits", "3",
                 "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--alphas", "0,1", "--betas", "0,1",
                 "--holdout", "0.2", "--holdout-tokens", "256", "--json", str(out)]) == 0
    r = json.load(open(out))
    assert len(r["grid"]) == 3  # α ∈ {0, 1} at β = 0, then β = 1 at the best α
    best = min(r["grid"], key=lambda g: g["ppl"])
    assert (r["alpha"], r["beta"], r["ppl"]) == (best["alpha"], best["beta"], best["ppl"])


def test_eval_mse_compares_with_the_source_model(model_dir, calib, tmp_path):
    out = tmp_path / "q"
    assert quantize(model_dir, calib, out, "--method", "rtn", "--bits", "2") == 0
    assert main(["-q", "eval", "--quantized", str(out), "--eval-text", calib, "--eval-tokens", "256",
                 "--eval-seqlen", "32", "--mse", "--mse-samples", "2", "--calib", calib, "--json", str(tmp_path / "e.json")]) == 0
    r = json.load(open(tmp_path / "e.json"))
    assert len(r["mse"]) == len(r["mse_normed"]) == 2 and all(x > 0 for x in r["mse"])


def test_quantize_with_export_writes_a_checked_compressed_tensors_dir(model_dir, calib, tmp_path, capsys):
    from loaq.export.check import check_export

    out, exp = tmp_path / "n", tmp_path / "ct"
    assert quantize(model_dir, calib, out, "--method", "gptq", "--bits", "3", "--export", str(exp),
                    "--export-dtype", "float32", "--scale-dtype", "float16") == 0
    check_export(str(exp))
    cfg = json.load(open(exp / "config.json"))["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert {g["weights"]["scale_dtype"] for g in cfg["config_groups"].values()} == {"torch.float16"}
    assert json.load(open(out / "loaq.json"))["config"]["spec"]["scale_dtype"] == "float16"  # a recipe keeps it
    exp.mkdir(exist_ok=True)
    other = tmp_path / "n2"
    assert quantize(model_dir, calib, other, "--export", str(exp)) == 2  # export target exists: refused up front
    assert "--force" in capsys.readouterr().err and not other.exists()


def test_quantize_rotated_w4a4_with_export_serves_what_it_evaluated(model_dir, calib, tmp_path):
    """`loaq quantize --rotate hadamard --act-bits 4 --export`: the export declares W4A4 and the engine's R4, and
    loads (load_export) to the same logits as the native checkpoint (load_native)."""
    import torch

    from loaq.checkpoint import load_native
    from loaq.export.check import check_export
    from loaq.export.load import load_export
    from loaq.export.transform import online_hadamard

    out, exp = tmp_path / "n", tmp_path / "ct"
    assert quantize(model_dir, calib, out, "--method", "loaq", "--bits", "4", "--rotate", "hadamard", "--act-bits", "4",
                    "--export", str(exp), "--export-dtype", "float32") == 0
    assert check_export(str(exp)).endswith("; W4A4; online R4 on 2 linears")
    assert list(online_hadamard(str(exp))) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_export(str(exp))[0](ids).logits, load_native(str(out))[0](ids).logits)


def test_a_command_line_process_skips_transformers_sklearn_import():
    """transformers' generation utilities import scikit-learn (installed with lm-eval) at import; a `loaq` /
    `loaq-export` process tells transformers it is absent first (loaq.cli.without_sklearn): ~1.2 s of every start.
    The control process shows the import happens without it."""
    import importlib.util
    import subprocess
    import sys

    assert importlib.util.find_spec("sklearn") is not None  # lm-eval's dependency: the control below needs it
    code = ("import sys; from loaq.cli import without_sklearn; {}; "
            "import transformers.generation.candidate_generator; print('sklearn' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", code.format(call)], stdout=subprocess.PIPE, text=True, env=env)
             for call in ("without_sklearn()", "None")]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["False", "True"], outs
