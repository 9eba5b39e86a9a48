"""Tiny random models of every supported architecture, built from a config (no hub)."""

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                          Qwen3Config, Qwen3MoeConfig)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
CONFIGS = {  # keyword arguments override COMMON's fields
    "llama": lambda **kw: LlamaConfig(**COMMON | kw),
    "mistral": lambda **kw: MistralConfig(**COMMON | kw, sliding_window=None),
    "qwen2": lambda **kw: Qwen2Config(**COMMON | kw),
    "qwen3": lambda **kw: Qwen3Config(**COMMON | kw, head_dim=16),
    "phi3": lambda **kw: Phi3Config(**COMMON | dict(pad_token_id=None, bos_token_id=None, eos_token_id=None) | kw),
    # sliding window 8 < the test windows, layer types sliding/global alternating: the per-layer masks and
    # rotary tables (local base 10⁴ vs global 10⁶) differ, so catching layer 0's kwargs only would be wrong
    "gemma3": lambda **kw: Gemma3TextConfig(**COMMON | dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                                                            layer_types=None, sliding_window_pattern=2,
                                                            tie_word_embeddings=True, pad_token_id=None,
                                                            bos_token_id=None, eos_token_id=None) | kw),
}
MOE_CONFIGS = {  # mixtures of experts (tests/test_moe.py; refused by rotation and W4A4, so not in CONFIGS)
    # 4 experts, top 2, expert width 32 (tiny calibration sets leave some experts with few tokens)
    "qwen3_moe": lambda **kw: Qwen3MoeConfig(**COMMON | dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                             norm_topk_prob=True, head_dim=16) | kw),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
                 "gemma3": "Gemma3ForCausalLM"}


def tiny_model(kind: str = "llama", seed: int = 0, vocab: int = 96, **config):
    """A random model of ``kind``; ``config`` overrides fields of :data:`COMMON` (e.g. ``num_hidden_layers=4``)."""
    torch.manual_seed(seed)
    cfg = (CONFIGS | MOE_CONFIGS)[kind](**config)
    cfg.vocab_size = vocab
    cfg.architectures = [ARCHITECTURES[kind]]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():  # HF initializes norms to 1 and small weights: give the streams some structure
        for n, p in model.named_parameters():
            if "norm" in n:  # Gemma's norms scale by 1 + g: the same range
                p.uniform_(0.5, 1.5) if kind != "gemma3" else p.uniform_(-0.5, 0.5)
            elif p.ndim >= 2:  # linears, and the fused experts of a MoE
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.02)
    return model


def tokens(n: int = 8, L: int = 32, vocab: int = 96, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, L), generator=g)


TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Quantization maps weights to a small grid. "
        "Layer-wise methods calibrate one layer at a time on real activations. ") * 20


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences (vocab <= 320)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


def tiny_model_dir(path, kind: str = "llama", **config):
    """Save a tiny model with a tokenizer as a Hugging Face directory (``config`` as in :func:`tiny_model`)."""
    model = tiny_model(kind, vocab=320, **config)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
