"""Reading and writing checkpoints in the released layout (docs/checkpoint.md).

Loading is strict (every expected key present with its shape, no unknown key) and memory-lean: the model is
built on the meta device and every tensor is read from the memory-mapped safetensors file straight into
the target dtype and device, one at a time, so no second full copy exists in RAM. The checkpoint folder
is only read. Weights are only ever read from safetensors files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..modeling.config import UniMedVLConfig
from ..modeling.tokenizer import make_tokenizer_config_portable
from ..modeling.unimedvl import UniMedVLModel
from ..modeling.vae import build_vae, diffusers_to_flux, diffusers_to_flux_key, flux_to_diffusers, strip_module_prefixes

# accelerate and diffusers are imported by the functions that use them, not with this module, so that
# importing the package stays fast.
if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

__all__ = ["CheckpointError", "WEIGHT_FILES", "VAE_FILE", "TOKENIZER_FILES", "load_model_weights", "load_vae",
           "build_empty_model", "save_checkpoint", "atomic_save_safetensors", "NO_SPLIT_MODULES", "finish_tensor"]

WEIGHT_FILES = {"ema": "ema.safetensors", "model": "model.safetensors"}
VAE_FILE = "ae.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
# A weights file may carry the VAE too (a Bagel built with a VAE submodule saves it under this prefix).
EMBEDDED_VAE_PREFIX = "vae_model."
NO_SPLIT_MODULES = ["MoTDecoderLayer", "SiglipEncoderLayer"]


class CheckpointError(ValueError):
    """A checkpoint is missing files, has missing or unexpected keys, or tensors of the wrong shape."""


def _describe(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_keys(expected: dict[str, tuple], found: dict[str, tuple], source: str) -> None:
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    wrong = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in expected.keys() & found.keys()
             if tuple(found[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_describe(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} keys with wrong shapes: {_describe(wrong, 10)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model configuration; " + "; ".join(problems))


def build_empty_model(config: UniMedVLConfig) -> UniMedVLModel:
    """The model with parameters on the meta device (buffers such as rotary frequencies are real)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return UniMedVLModel(config)


def _file_shapes(handle) -> dict[str, tuple]:
    return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _open(path: Path, device: str = "cpu"):
    if not path.is_file():
        raise CheckpointError(f"missing weights file {path}")
    try:
        return safe_open(str(path), framework="pt", device=device)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read {path}: {err}") from err


def load_model_weights(model: UniMedVLModel, path: Path, dtype: torch.dtype, device: torch.device,
                       device_map: dict[str, str | int] | None = None, offload_folder: str | None = None,
                       progress: bool = True, quantize: Callable[[str, torch.nn.Module], None] | None = None,
                       on_host: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Fill a meta-device model from ``ema.safetensors``/``model.safetensors`` in place.

    ``quantize(name, model)``, when given, is called right after each tensor is placed (it quantises the
    tensor's layer where it is, so the device never holds more than one full-precision layer); tensors for
    which ``on_host(name)`` is true are kept in host memory (task residency, docs/quantization.md).
    Returns the VAE tensors embedded in the file under ``vae_model.`` (usually none).
    """
    from accelerate import dispatch_model
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    read_device = str(device) if device_map is None and device.type == "cuda" else "cpu"
    with _open(path, read_device) as handle:
        shapes = _file_shapes(handle)
        embedded_vae = {k for k in shapes if k.startswith(EMBEDDED_VAE_PREFIX)}
        check_keys(expected, {k: v for k, v in shapes.items() if k not in embedded_vae}, str(path))
        index: dict = {}
        for name in tqdm(sorted(expected), desc=f"loading {path.name}", disable=not progress, leave=False):
            target = _device_for(name, device_map) if device_map is not None else device
            tensor = handle.get_tensor(name).to(dtype)
            if target == "disk":
                offload_weight(tensor, name, offload_folder, index=index)
                continue
            set_module_tensor_to_device(model, name, target, value=tensor, dtype=dtype)
            del tensor
            finish_tensor(model, name, quantize, on_host)
        vae_tensors = {k[len(EMBEDDED_VAE_PREFIX):]: handle.get_tensor(k) for k in embedded_vae}
    if device_map is None:
        # Buffers (rotary frequencies) were built on the CPU; left there, every forward would copy them to the
        # device, a transfer that also keeps a decoding step from being captured as a CUDA graph.
        for name, buffer in list(model.named_buffers()):
            set_module_tensor_to_device(model, name, device, value=buffer)
    if index:
        save_offload_index(index, offload_folder)
    if device_map is not None:
        dispatch_model(model, device_map=device_map, main_device=str(device), offload_dir=offload_folder,
                       offload_index=index or None)
    return vae_tensors


def finish_tensor(model: torch.nn.Module, name: str, quantize: Callable[[str, torch.nn.Module], None] | None,
                  on_host: Callable[[str], bool] | None) -> None:
    """After a parameter is placed on the device: quantise its layer there, then move it to host memory
    when ``on_host(name)`` (the steps of ``load_model_weights``, for models filled another way too)."""
    if quantize is not None:
        quantize(name, model)
    if on_host is not None and on_host(name):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        module._parameters[leaf] = torch.nn.Parameter(module._parameters[leaf].to("cpu"), requires_grad=False)


def _device_for(name: str, device_map: dict[str, str | int]):
    best = max((m for m in device_map if m == "" or name == m or name.startswith(m + ".")), key=len, default=None)
    if best is None:
        raise CheckpointError(f"device_map places no module holding {name}")
    value = device_map[best]
    return f"cuda:{value}" if isinstance(value, int) else value


def normalize_device_map(model: torch.nn.Module, device_map: dict[str, str | int]) -> dict[str, str | int]:
    """Turn a map with nested entries (``{"": "cpu", "language_model.model.layers.1": "disk"}``) into the
    non-overlapping partition of modules accelerate dispatches."""
    keys = set(device_map)

    def covering(name: str):
        best = max((k for k in keys if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        if best is None:
            raise CheckpointError(f"device_map places no module holding {name or 'the model'}")
        return device_map[best]

    out: dict[str, str | int] = {}

    def visit(name: str, module: torch.nn.Module) -> None:
        prefix = name + "." if name else ""
        nested = any(k.startswith(prefix) and k != name for k in keys) if name else any(k for k in keys)
        if not nested or not list(module.children()):
            out[name] = covering(name)
            return
        if any(True for _ in module.parameters(recurse=False)):
            raise CheckpointError(f"device_map splits {name or 'the model'}, which holds parameters directly")
        for child_name, child in module.named_children():
            visit(prefix + child_name, child)

    visit("", model)
    return out


def infer_device_map(model: UniMedVLModel, dtype: torch.dtype, max_memory: dict | None) -> dict[str, str | int]:
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT_MODULES, dtype=dtype)


def load_vae(config: UniMedVLConfig, path: Path, dtype: torch.dtype, device: torch.device,
             override: dict[str, torch.Tensor] | None = None) -> AutoencoderKL:
    """The FLUX VAE from ``ae.safetensors`` (or from tensors embedded in the weights file) as diffusers'
    ``AutoencoderKL``, strictly: every FLUX key used, every diffusers key filled."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        vae = build_vae(config.vae)
    expected_flux = {diffusers_to_flux_key(k, len(config.vae.ch_mult)): k for k in vae.state_dict()}
    if override:
        state, source = strip_module_prefixes(override), f"{EMBEDDED_VAE_PREFIX}* tensors of the weights file"
    else:
        with _open(path) as handle:
            state = strip_module_prefixes({k: handle.get_tensor(k) for k in handle.keys()})
        source = str(path)
    unexpected = state.keys() - expected_flux.keys()
    missing = expected_flux.keys() - state.keys()
    if unexpected or missing:
        parts = [f"{len(missing)} missing keys: {_describe(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys: {_describe(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{source} does not match vae_config; " + "; ".join(parts))
    converted = flux_to_diffusers(state, config.vae)
    del state
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    check_keys(expected, {k: tuple(v.shape) for k, v in converted.items()}, source)
    converted = {k: v.to(device=device, dtype=dtype) for k, v in converted.items()}
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir: str | Path, config: UniMedVLConfig, weights: dict[str, dict[str, torch.Tensor]],
                    vae: AutoencoderKL, tokenizer=None, tokenizer_dir: Path | None = None) -> Path:
    """Write the released layout: configs, each weights file of ``weights`` (file name -> state dict, e.g.
    ``ema.safetensors``), ``ae.safetensors`` in FLUX key names, and the tokenizer files (copied as they are
    from ``tokenizer_dir``, else written by ``tokenizer.save_pretrained``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for state in weights.values():
        if any(t.device.type == "meta" for t in state.values()):
            raise CheckpointError("cannot save weights that are offloaded (meta tensors); load the model onto "
                                  "one device first")
        if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in state.values()):
            raise CheckpointError("cannot save quantised weights (the released layout holds full-precision "
                                  "tensors); load the checkpoint without quantization to save it")
    config.save(out_dir)
    for name, state in weights.items():
        atomic_save_safetensors(state, out_dir / name)
    flux = {k: v.detach().cpu() for k, v in diffusers_to_flux(vae.state_dict(), config.vae).items()}
    atomic_save_safetensors(flux, out_dir / VAE_FILE)
    if tokenizer_dir is not None:
        found = [name for name in TOKENIZER_FILES if (Path(tokenizer_dir) / name).is_file()]
        if not found:
            raise CheckpointError(f"no tokenizer files in {tokenizer_dir}; the checkpoint would not load")
        if Path(tokenizer_dir).resolve() != out_dir.resolve():
            for name in found:
                shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    elif tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    if (out_dir / "tokenizer_config.json").is_file() and (out_dir / "tokenizer.json").is_file():
        make_tokenizer_config_portable(out_dir)
    return out_dir
