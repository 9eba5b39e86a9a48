"""Hadamard rotation (loaq.rotation) leaves the float model's function unchanged."""

import copy

import pytest
import torch

from loaq.arch import arch_of
from loaq.rotation import rotate_model
from tests.tiny import CONFIGS, tiny_model, tokens


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def rotated_logits(model, X, seed=0):
    r = copy.deepcopy(model)
    rot = rotate_model(r, arch_of(r.config), seed)
    with torch.no_grad():
        return model(X).logits, r(X).logits, r, rot


@pytest.mark.parametrize("kind", [k for k in CONFIGS if k != "gemma3"])  # Gemma 3 refuses: tests/test_families.py
def test_rotated_tiny_model_gives_the_same_logits(kind):
    ref, out, r, rot = rotated_logits(tiny_model(kind), tokens())
    assert rel_err(ref, out) <= 1e-4
    layer = r.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert rot.meta()["r4"]["order"] == 128 and not rot.untied


def test_odd_orders_and_tied_embeddings():
    """hidden 96 = 12·8, head_dim 24 = 12·2, intermediate 224 = 28·8, tied embeddings (untied on rotation)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.08)
    ref, out, r, rot = rotated_logits(model, tokens(), seed=7)
    assert rel_err(ref, out) <= 1e-4
    m = rot.meta()
    assert (m["r1"]["had_k_order"], m["r2"]["had_k_order"], m["r4"]["had_k_order"]) == (12, 12, 28)
    assert m["untied_embeddings"] and not r.config.tie_word_embeddings
    assert r.lm_head.weight.data_ptr() != r.model.embed_tokens.weight.data_ptr()
    assert tuple(rot.tensors()["r4.had_k"].shape) == (28, 28)
    # a different seed is a different (still exact) rotation
    _, out2, r2, _ = rotated_logits(model, tokens(), seed=8)
    assert rel_err(ref, out2) <= 1e-4
    assert not torch.equal(r.model.embed_tokens.weight, r2.model.embed_tokens.weight)


def test_r4_blocks_rotation_is_exact_and_block_diagonal():
    """--r4-blocks 2 on intermediate 128: R4 = I_2 ⊗ H_64 / 8, had_k = √2 I_2; the function is unchanged and
    the map never mixes the two halves (a tensor-parallel rank's slice)."""
    from loaq import hadamard
    from loaq.errors import LoaQError
    from loaq.rotation import RotationSpec

    model = tiny_model("llama")
    r = copy.deepcopy(model)
    rot = rotate_model(r, arch_of(r.config), 0, r4_blocks=2)
    X = tokens()
    with torch.no_grad():
        assert rel_err(model(X).logits, r(X).logits) <= 1e-4
    assert (rot.meta()["r4"]["blocks"], rot.meta()["r4"]["had_k_order"]) == (2, 2)
    x = torch.zeros(1, 128, dtype=torch.float64)
    x[0, 70] = 1
    y = hadamard.multiply(x, rot.r4)
    assert y[0, :64].abs().max() == 0 and abs(y[0, 64:].norm().item() - 1) < 1e-6
    with pytest.raises(LoaQError, match="add --rotate hadamard"):
        RotationSpec("none", 0, 2)
    with pytest.raises(LoaQError, match="does not divide the R4 width"):
        rotate_model(copy.deepcopy(model), arch_of(model.config), 0, r4_blocks=3)
