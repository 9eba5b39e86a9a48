"""Native LoaQ checkpoints and the per-layer store behind ``--resume``.

A native checkpoint directory holds everything an exporter needs, nothing to recompute:

- ``loaq.json``: format version, method (α, β, switches), grid, solver, calibration (source, size,
  seed, token hash), versions, source model, and the list of quantized linears;
- ``weights/``: one safetensors shard per decoder layer (``layer-00000.safetensors``: per linear
  ``<name>.codes`` (uint8, unsigned 0..2^b-1, [out, in]), ``<name>.scales`` (float32, [out, n_groups]) and
  ``<name>.zeros`` (int32, unsigned, [out, n_groups]; float32 only for NeUQI's continuous zero points, which
  compressed-tensors cannot hold), plus the layer's norms and biases), ``rest.safetensors`` (embeddings,
  final norm, lm_head) and ``index.json`` (tensor → shard), see :mod:`loaq.shards`; a layer's shard is
  written when it finishes. Format ``loaq-native/1`` (``quantized.safetensors`` + ``model.safetensors``)
  is still read;
- ``config.json``, ``generation_config.json`` and the tokenizer files;
- W4A4 and rotation: ``loaq.json`` ``"activations"`` (``{"bits": 4, "symmetric": …}``)
  and ``"rotation"`` (:meth:`loaq.rotation.Rotation.meta`), plus ``rotation.safetensors`` with
  ``"r4.had_k"``. R1/R2 and the norm scales are already in the stored weights; :func:`load_native`
  re-attaches the online R4 and the activation fake quantizer so the loaded model is the deployed one.

Writes go to a temporary sibling directory (with an owner file naming the writing process) renamed
at the end, with umask-derived modes; temporary siblings of killed runs are removed by the next write.
An existing output is refused unless ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager

import torch
from safetensors.torch import load_file, save_file

from loaq.errors import LoaQError
from loaq.grids import GridSpec, dequantize, expand
from loaq.solver import QuantResult

FORMAT = "loaq-native/2"  # weights in per-layer shards (loaq.shards); loaq-native/1 is still read
OWNER = ".loaq-owner"  # inside a temporary output: {"pid", "host"} of the writing process


def _atomic_save(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def results_to_tensors(results: dict[str, QuantResult]) -> dict[str, torch.Tensor]:
    out = {}
    for name, r in results.items():
        out[f"{name}.codes"] = r.codes.to(torch.uint8)
        out[f"{name}.scales"] = r.scales.float()
        integral = torch.equal(r.zeros, torch.round(r.zeros))
        out[f"{name}.zeros"] = r.zeros.to(torch.int32) if integral else r.zeros.float()
    return out


def tensors_to_results(t: dict[str, torch.Tensor], where: str = "quantized tensors") -> dict[str, QuantResult]:
    """The quantized linears among ``t`` (their ``codes``/``scales``/``zeros``; other tensors are ignored)."""
    from loaq.shards import is_quantized_part

    names = sorted({k.rsplit(".", 1)[0] for k in t if is_quantized_part(k)})
    for n in names:
        for part in ("codes", "scales", "zeros"):
            if f"{n}.{part}" not in t:
                raise LoaQError(f"{where} lacks tensor {n}.{part}; the checkpoint is damaged, re-run `loaq quantize`")
    return {n: QuantResult(t[f"{n}.codes"], t[f"{n}.scales"], t[f"{n}.zeros"].float()) for n in names}


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """``load_file`` of a checkpoint's safetensors file; a truncated or corrupted one is a one-line :class:`LoaQError`."""
    from safetensors import SafetensorError

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise LoaQError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0]}); "
                        "re-run `loaq quantize` or copy the checkpoint again") from None


def dequantized(r: QuantResult, spec: GridSpec) -> torch.Tensor:
    """``scale · (code − zero)`` of a stored result, [out, in] float32 (bit-identical to the solver's Q)."""
    in_f = r.codes.shape[1]
    return dequantize(r.codes.float(), expand(r.scales, spec, in_f), expand(r.zeros.float(), spec, in_f))


def layer_specs(meta: dict, names: list[str]) -> dict[str, GridSpec]:
    """Grid of every quantized linear: the run's ``config.spec``, overridden per layer by ``layer_specs``
    (``{name: {bits, group_size, symmetric, init}}``) where present (a per-linear allocation, :mod:`loaq.allocation`)."""
    base = GridSpec(**meta["config"]["spec"])
    over = meta.get("layer_specs") or {}
    specs = {}
    for n in names:
        try:
            specs[n] = GridSpec(**over[n]) if n in over else base
        except (TypeError, ValueError, LoaQError):
            raise LoaQError(f"loaq.json layer_specs.{n} is not a grid (bits, group_size, symmetric): {over[n]}; "
                            "fix the entry or re-run the allocation") from None
    return specs


def check_output(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise LoaQError(f"output {path!r} already exists; pass --force to overwrite it or choose another path")


class LayerStore:
    """Per-layer checkpoints of a running quantization in ``workdir`` (``--resume`` reads them back).

    ``layers/NNNN.safetensors`` holds each finished layer's codes (written every layer); ``streams-NNNN/``
    the streams entering layer ``NNNN`` (one file per batch, in their storage dtype), written every
    ``stream_every`` layers (0: never) and when an interruption finds them at a layer boundary; only the
    newest is kept, so the store holds one copy of the streams whatever the depth. Resume continues after
    the finished layers, replaying forward those after the saved streams (:func:`loaq.pipeline.replay_layer`;
    none saved: from the captured layer-0 inputs). ``workdir`` is created with the first finished layer, so
    an interruption before it leaves nothing. Every file and stream directory is written under a temporary
    name and renamed: a kill at any point leaves ``run.json``, each layer file and each streams directory
    whole or absent.
    """

    def __init__(self, workdir: str, digest: str, spec: GridSpec, stream_every: int = 8,
                 specs: dict[str, GridSpec] | None = None):
        self.workdir, self.digest, self.spec, self.specs = workdir, digest, spec, specs or {}
        self.stream_every = stream_every
        meta = os.path.join(workdir, "run.json")
        if os.path.exists(meta):
            old = json.load(open(meta))["digest"]
            if old != digest:
                raise LoaQError(f"{workdir!r} holds a run with other settings; rerun with the same flags or pass --force to start over")

    def _layer_path(self, i: int) -> str:
        return os.path.join(self.workdir, "layers", f"{i:04d}.safetensors")

    def _create(self) -> None:
        os.makedirs(os.path.join(self.workdir, "layers"), exist_ok=True)
        meta = os.path.join(self.workdir, "run.json")
        if not os.path.exists(meta):
            with open(f"{meta}.tmp", "w") as fh:
                json.dump({"digest": self.digest}, fh)
            os.replace(f"{meta}.tmp", meta)

    def layer_path(self, i: int) -> str:
        """Layer ``i``'s shard (its results and other tensors; moved into the checkpoint by :func:`save_native`)."""
        return self._layer_path(i)

    def save_results(self, i: int, results: dict[str, QuantResult], extra: dict | None = None) -> None:
        """Layer ``i``'s shard: its quantized linears and ``extra`` (the layer's other tensors, :func:`layer_tensors`)."""
        self._create()
        _atomic_save(results_to_tensors(results) | (extra or {}), self._layer_path(i))

    def layer_results(self, i: int) -> dict[str, QuantResult]:
        return tensors_to_results(load_tensors(self._layer_path(i)))

    def save_layer(self, i: int, results: dict[str, QuantResult], streams, extra: dict | None = None) -> None:
        """Keep layer ``i``'s shard; every ``stream_every`` layers also the streams entering layer ``i + 1``."""
        self.save_results(i, results, extra)
        if self.stream_every and (i + 1) % self.stream_every == 0:
            self.save_streams(i + 1, streams)

    def finished(self) -> int:
        """How many layers (0, 1, ...) have their codes on disk."""
        n = 0
        while os.path.exists(self._layer_path(n)):
            n += 1
        return n

    def _saved_streams(self) -> list[int]:
        if not os.path.isdir(self.workdir):
            return []
        return sorted(int(d[8:]) for d in os.listdir(self.workdir) if d.startswith("streams-") and d[8:].isdigit())

    def save_streams(self, layer: int, streams) -> None:
        """Write the streams entering ``layer`` (a :class:`loaq.streams.Streams`), one batch at a time."""
        self._create()
        final = os.path.join(self.workdir, f"streams-{layer:04d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        parts = {"h_hat": streams.h_hat.cpu(), "h": streams.h.cpu() if streams.h is not None else iter(())}
        for name, batches in parts.items():
            for b, x in enumerate(batches):
                save_file({"x": x.contiguous()}, os.path.join(tmp, f"{name}.{b:05d}.safetensors"))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in self._saved_streams():
            if old != layer:
                shutil.rmtree(os.path.join(self.workdir, f"streams-{old:04d}"), ignore_errors=True)

    def save_interrupted(self, streams) -> None:
        """On an interruption: save the streams if they sit at the boundary of the finished layers and are
        newer than the saved ones (mid-layer they are partly advanced and cannot be kept)."""
        at = streams.at_layer
        if at is None or at == 0 or at != self.finished() or at in self._saved_streams():
            return
        self.save_streams(at, streams)

    def load_streams(self, streams, upto: int) -> int:
        """Fill ``streams`` with the newest saved streams entering a layer ``≤ upto``; returns that layer
        (0, and ``streams`` untouched, when none is saved: they are the captured layer-0 inputs)."""
        saved = [k for k in self._saved_streams() if k <= upto]
        if not saved:
            return 0
        k = saved[-1]
        d = os.path.join(self.workdir, f"streams-{k:04d}")
        for name in ("h_hat", "h"):
            stream = getattr(streams, name)
            if stream is None:
                continue
            for b in range(len(stream)):
                stream.set(b, load_tensors(os.path.join(d, f"{name}.{b:05d}.safetensors"))["x"])
        return k

    def load_results(self, upto: int) -> dict[str, QuantResult]:
        """Results of layers ``0..upto-1``."""
        results = {}
        for i in range(upto):
            results |= self.layer_results(i)
        return results

    def save_json(self, name: str, obj: dict) -> None:
        """Keep ``obj`` (e.g. the allocation, whose measurement a resume need not repeat) as ``name`` in the store."""
        self._create()
        path = os.path.join(self.workdir, name)
        with open(f"{path}.tmp", "w") as fh:
            json.dump(obj, fh)
        os.replace(f"{path}.tmp", path)

    def load_json(self, name: str) -> dict | None:
        path = os.path.join(self.workdir, name)
        return json.load(open(path)) if os.path.exists(path) else None


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it races other threads)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _publish_modes(root: str) -> None:
    """Give a finished temporary tree the modes a plain ``mkdir``/``open`` would have (``mkdtemp`` makes it
    0700/0600): directories ``0o777 & ~umask``, files ``0o666 & ~umask``, so other users (a vLLM server) can read it."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _owner_alive(tmp: str) -> bool:
    """Whether the process recorded in ``tmp``'s owner file may still be writing it (unknown owners count as alive)."""
    try:
        with open(os.path.join(tmp, OWNER)) as fh:
            owner = json.load(fh)
        pid, host = int(owner["pid"]), owner["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def remove_stale(parent: str, prefix: str) -> list[str]:
    """Remove the temporary outputs (``prefix*`` in ``parent``) of killed runs: those whose owner PID is gone."""
    removed = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(prefix) and os.path.isdir(path) and not _owner_alive(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def atomic_dir(out_dir: str, force: bool, prefix: str = ".loaq-"):
    """Yield a temporary sibling of ``out_dir`` to write into; it replaces ``out_dir`` when the block
    succeeds and is removed when it raises, so no half-written output is ever left behind.

    The temporary directory holds an owner file (PID, host) until the rename; temporary siblings whose owner
    is dead (a SIGKILLed run) are removed first. The output gets umask-derived modes, not ``mkdtemp``'s 0700."""
    check_output(out_dir, force)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    remove_stale(parent, prefix)
    tmp = os.path.join(parent, prefix + uuid.uuid4().hex[:12])  # named first: an interrupt leaves nothing unowned
    try:
        os.mkdir(tmp, 0o700)
        with open(os.path.join(tmp, OWNER), "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, fh)
        yield tmp
        os.unlink(os.path.join(tmp, OWNER))
        _publish_modes(tmp)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def layer_tensors(layer, prefix: str, results: dict[str, QuantResult]) -> dict[str, torch.Tensor]:
    """The tensors of decoder layer ``layer`` (names under ``prefix``) a checkpoint keeps besides its quantized
    linears' codes: norms, biases."""
    return {prefix + k: v.detach().cpu() for k, v in layer.state_dict().items()
            if not (k.endswith(".weight") and prefix + k.removesuffix(".weight") in results)}


def rest_tensors(model, arch) -> dict[str, torch.Tensor]:
    """The tensors outside the decoder layers (embeddings, final norm, lm_head), tied ones once."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if k.startswith(arch.layers + ".") or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().cpu()
    return out


def save_native(out_dir: str, model, tokenizer, results: dict[str, QuantResult], meta: dict, force: bool,
                rotation=None, *, store=None, rest: dict[str, torch.Tensor] | None = None) -> None:
    """Write a native checkpoint to a temporary sibling and rename it to ``out_dir``; ``rotation`` (a
    :class:`loaq.rotation.Rotation`) adds its ``"rotation"`` metadata and ``rotation.safetensors``.

    Weights go to per-layer shards (:mod:`loaq.shards`): a layer's shard is moved from ``store`` (a
    :class:`LayerStore`) where it wrote one, else built from ``results`` and ``model``'s layer; ``rest`` (the
    tensors outside the layers, :func:`rest_tensors`) defaults to ``model``'s. A lazily loaded ``model`` (a
    skeleton) needs both ``store`` and ``rest``. Every tensor the model has must end up in a shard."""
    from loaq.arch import arch_of
    from loaq.rotation import R4_FILE
    from loaq.shards import REST, WEIGHTS, is_quantized_part, layer_file, write_index

    arch = arch_of(model.config)
    with atomic_dir(out_dir, force) as tmp:
        wdir = os.path.join(tmp, WEIGHTS)
        os.mkdir(wdir)
        for i, layer in enumerate(arch.decoder_layers(model)):
            dst, prefix = os.path.join(wdir, layer_file(i)), f"{arch.layers}.{i}."
            src = store.layer_path(i) if store is not None else None
            if src and os.path.isfile(src):
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            else:
                mine = {n: r for n, r in results.items() if n.startswith(prefix)}
                _atomic_save(results_to_tensors(mine) | layer_tensors(layer, prefix, mine), dst)
        _atomic_save(rest if rest is not None else rest_tensors(model, arch), os.path.join(wdir, REST))
        weight_map = write_index(wdir, FORMAT)
        quantized = sorted({k.rsplit(".", 1)[0] for k in weight_map if is_quantized_part(k)})
        tied = getattr(model.config, "tie_word_embeddings", False)
        want = {k for k in model.state_dict() if k.removesuffix(".weight") not in quantized
                and not (tied and k == f"{arch.lm_head}.weight")}
        missing = sorted(want - set(weight_map))
        if missing:
            raise LoaQError(f"the checkpoint would lack {', '.join(missing[:3])}; the per-layer store of this run is "
                            "from another version, re-run without --resume")
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if rotation is not None:
            save_file(rotation.tensors(), os.path.join(tmp, R4_FILE))
        meta = {"format": FORMAT, "activations": None, **meta, "rotation": rotation.meta() if rotation else None,
                "quantized": quantized}
        with open(os.path.join(tmp, "loaq.json"), "w") as fh:
            json.dump(meta, fh, indent=2)


def read_meta(path: str) -> dict:
    """``loaq.json`` of a native checkpoint, with the grid every reader needs (``config.spec``) checked."""
    p = os.path.join(path, "loaq.json")
    if not os.path.isfile(p):
        raise LoaQError(f"{path!r} is not a LoaQ checkpoint (no loaq.json); pass the directory `loaq quantize --out` wrote")
    try:
        meta = json.load(open(p))
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LoaQError(f"{p} is not valid JSON ({str(exc).splitlines()[0]}); the checkpoint is damaged, "
                        "re-run `loaq quantize`") from None
    config = meta.get("config") if isinstance(meta, dict) else None
    spec = config.get("spec") if isinstance(config, dict) else None
    try:
        GridSpec(**spec)
    except (TypeError, ValueError, LoaQError):
        raise LoaQError(f"{p} has no valid config.spec (the grid: bits, group_size, symmetric); the checkpoint "
                        "is damaged, re-run `loaq quantize`") from None
    return meta


def load_native(path: str, dtype: torch.dtype = torch.float32):
    """(model with dequantized weights, tokenizer, meta) from a native checkpoint; a rotated checkpoint
    gets its online R4 before every ``down_proj`` and a W4A4 one the activation fake quantizer on every
    quantized linear (after R4), so the model computes what will be deployed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from loaq import actquant
    from loaq.arch import arch_of
    from loaq.rotation import attach_online, load_had_k

    meta = read_meta(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    from loaq.moe import unfuse
    from loaq.shards import NativeTensors, is_quantized_part

    unfuse(model, arch_of(config))
    stored, sd = NativeTensors(path), {}
    for names in stored.groups():  # one shard (layer) at a time
        t = stored.read(names)
        sd |= {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items() if not is_quantized_part(k)}
        results = tensors_to_results(t, path)
        specs = layer_specs(meta, sorted(results))
        for name, r in results.items():
            sd[f"{name}.weight"] = dequantized(r, specs[name]).to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    model.tie_weights()
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise LoaQError(f"checkpoint {path!r} is incomplete: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if meta.get("rotation"):
        attach_online(model, arch_of(config), load_had_k(path))
    if meta.get("activations"):
        act = actquant.ActSpec(**meta["activations"])
        actquant.attach([model.get_submodule(n) for n in meta["quantized"]], act)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok, meta
