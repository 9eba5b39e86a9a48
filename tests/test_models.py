import os
import struct

import pytest
import torch

from loaq.errors import LoaQError
from loaq.models import Source, load_config, load_model, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face hub cache holding ``tiny-org/tiny-llama`` at ``main`` -> COMMIT."""
    from tests.tiny import tiny_model_dir

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    tiny_model_dir(repo / "snapshots" / COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / COMMIT


def test_hub_id_resolves_from_the_local_cache(hub_cache):
    src = resolve("tiny-org/tiny-llama")
    assert os.path.samefile(src.directory, hub_cache) and src.gguf_file is None
    assert (src.repo_id, src.revision, src.label) == ("tiny-org/tiny-llama", COMMIT, f"tiny-org/tiny-llama@{COMMIT}")
    again = resolve(src.label)  # the label recorded in checkpoints resolves to the same snapshot
    assert os.path.samefile(again.directory, hub_cache)
    assert load_config(src).num_hidden_layers == 2


def test_load_model_takes_a_hub_id_or_a_source(hub_cache):
    from tests.tiny import tiny_model

    model, tok, arch, src = load_model("tiny-org/tiny-llama")
    ref = tiny_model("llama", vocab=320)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))
    assert tok("The quick brown fox")["input_ids"]
    model2, _, _, src2 = load_model(src)
    assert src2 is src and torch.equal(model2.lm_head.weight, model.lm_head.weight)


def test_uncached_hub_id_offline_is_one_line(hub_cache, tmp_path):
    with pytest.raises(LoaQError, match=r"'tiny-org/other' is not in the local Hugging Face cache .*HF_HUB_OFFLINE=1 "
                                        r"forbids downloading it; unset HF_HUB_OFFLINE") as e:
        resolve("tiny-org/other")
    assert "\n" not in str(e.value)
    with pytest.raises(LoaQError, match=r"'tiny-org/tiny-llama@v2' is not in the local Hugging Face cache"):
        resolve("tiny-org/tiny-llama@v2")
    assert sorted(os.listdir(tmp_path / "hub")) == ["models--tiny-org--tiny-llama"]  # nothing written


def test_bad_local_paths_keep_their_messages(tmp_path):
    with pytest.raises(LoaQError, match="does not exist; pass a Hugging Face model directory or a .gguf file"):
        resolve(str(tmp_path / "missing"))
    with pytest.raises(LoaQError, match="does not exist"):
        resolve("org/model.gguf")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(LoaQError, match="is not a .gguf file"):
        resolve(str(tmp_path / "w.bin"))
    with pytest.raises(LoaQError, match="has no config.json"):
        resolve(str(tmp_path))


def test_local_directory_and_gguf_sources_are_unchanged(tmp_path):
    from tests.tiny import tiny_model_dir

    d = str(tiny_model_dir(tmp_path / "m"))
    assert resolve(d) == Source(d) and resolve(d).label == d
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))  # resolve reads the header only
    g = resolve(str(tmp_path / "x.gguf"))
    assert (g.directory, g.gguf_file, g.label) == (str(tmp_path), "x.gguf", str(tmp_path / "x.gguf"))


def test_invalid_hub_id_is_one_line(hub_cache):
    with pytest.raises(LoaQError, match="does not exist and is no valid Hugging Face Hub id"):
        resolve("tiny-org/name-")
