import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# triton.jit reads TRITON_INTERPRET when a kernel module is first imported, whichever test imports it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, arch) of the offline SmolLM2-135M in float32, loaded once; deep-copy before changing it."""
    from loaq.models import load_model

    model, tok, arch, _ = load_model(None)
    return model, tok, arch


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama with its BPE tokenizer saved as a Hugging Face directory (read-only: copy to change)."""
    from tests.tiny import tiny_model_dir

    return tiny_model_dir(str(tmp_path_factory.mktemp("m") / "tiny"))


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """A calibration/evaluation text file for the tiny model."""
    from tests.tiny import TEXT

    p = tmp_path_factory.mktemp("c") / "calib.txt"
    p.write_text(TEXT * 4)
    return str(p)
