"""The loaded model's parts and how they are loaded and saved: the transformer, the VAE, the tokenizer, the
configuration, device and dtype. Task pipelines (``understanding``, ``text_to_image``, ``editing``) take a
``Components`` and add no state of their own.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from ..io.checkpoint import (
    VAE_FILE,
    WEIGHT_FILES,
    CheckpointError,
    build_empty_model,
    infer_device_map,
    load_model_weights,
    load_vae,
    normalize_device_map,
    save_checkpoint,
)
from ..io.hub import checkpoint_name, resolve_checkpoint
from ..io.provenance import Provenance
from ..modeling.config import UniMedVLConfig
from ..modeling.tokenizer import SpecialTokenIds, load_tokenizer
from ..modeling.unimedvl import UniMedVLModel
from ..modeling.vae import build_vae

__all__ = ["Components", "default_device", "default_dtype", "as_dtype"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _resolve_device_map(model, device_map, dtype, max_memory):
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "sequential"):
            raise ValueError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got {device_map!r}")
        return infer_device_map(model, dtype, max_memory)
    return normalize_device_map(model, device_map) if device_map is not None else None


def _offload_folder(device_map, offload_folder, checkpoint: Path) -> str | None:
    if device_map is not None and offload_folder is None and "disk" in device_map.values():
        offload_folder = tempfile.mkdtemp(prefix="unimedvl-offload-")
    if offload_folder is None:
        return None
    if Path(offload_folder).resolve() == checkpoint.resolve():
        raise ValueError("offload_folder must not be the checkpoint folder")
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    return str(offload_folder)


def _weights_file(path: Path, weights: str) -> Path:
    if weights not in WEIGHT_FILES:
        raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
    chosen = path / WEIGHT_FILES[weights]
    if not chosen.is_file() and weights == "ema" and (path / WEIGHT_FILES["model"]).is_file():
        log.info("no ema.safetensors in %s; using model.safetensors", path.name)
        chosen = path / WEIGHT_FILES["model"]
    return chosen


class Components:
    """The transformer (LLM, ViT, heads; ``ema.safetensors``), the FLUX VAE (diffusers ``AutoencoderKL``), the
    tokenizer with its special tokens (docs/token-layout.md#special-tokens) and the checkpoint configuration.

    Args:
        tokenizer_dir: where the tokenizer files came from (copied as they are by ``save_pretrained``).
        name: a short description printed in outputs (e.g. the checkpoint folder name).
    """

    def __init__(self, model: UniMedVLModel, vae, tokenizer, config: UniMedVLConfig,
                 tokenizer_dir: Path | None = None, name: str = "UniMedVL", weights_file: Path | None = None):
        self.model, self.vae, self.tokenizer, self.config = model, vae, tokenizer, config
        self.tokenizer_dir = tokenizer_dir
        self.provenance = Provenance(name, weights_file)
        self.special = SpecialTokenIds.from_tokenizer(tokenizer)
        vocab = config.llm["vocab_size"]
        too_big = [t for t in self.special.all() if t >= vocab]
        if too_big:
            raise CheckpointError(f"tokenizer ids {too_big} do not fit the embedding table of {vocab} rows")
        self.progress = True
        self.model.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, weights: str = "ema",
                        device_map: str | dict | None = None, max_memory: dict | None = None,
                        offload_folder: str | Path | None = None, progress: bool = True,
                        revision: str | None = None):
        """Load a checkpoint folder in the released layout (docs/checkpoint.md), strictly.

        Args:
            path: folder with ``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` (or
                ``model.safetensors``), ``ae.safetensors``, tokenizer files and optionally ``config.json``;
                or a Hugging Face Hub id (``General-Medical-AI/UniMedVL``), fetched into or found in the Hub
                cache (docs/checkpoint.md#hub-ids).
            revision: the Hub branch, tag or commit (Hub ids only).
            device: where to run; CUDA when available, else CPU.
            dtype: parameter dtype; bfloat16 on GPU and float32 on CPU by default.
            weights: ``"ema"`` (``ema.safetensors``, the default) or ``"model"`` (``model.safetensors``).
            device_map: ``"auto"`` (or an accelerate device map) to spread layers over GPUs and offload the
                rest to CPU or disk; ``max_memory`` bounds each device as in accelerate.
            offload_folder: where disk-offloaded weights go (a temporary folder by default; never the
                checkpoint folder).
        """
        name = checkpoint_name(path, revision)
        path = resolve_checkpoint(path, revision, weights)
        device = torch.device(device) if device is not None else default_device()
        dtype = as_dtype(dtype) if dtype is not None else default_dtype(device)
        weights_path = _weights_file(path, weights)
        config = UniMedVLConfig.from_dir(path)
        tokenizer = load_tokenizer(path)
        model = build_empty_model(config)
        device_map = _resolve_device_map(model, device_map, dtype, max_memory)
        offload = _offload_folder(device_map, offload_folder, path)
        embedded_vae = load_model_weights(model, weights_path, dtype, device, device_map, offload, progress)
        vae = load_vae(config, path / VAE_FILE, dtype, device, override=embedded_vae or None)
        return cls(model, vae, tokenizer, config, tokenizer_dir=path, name=name, weights_file=weights_path)

    @classmethod
    def from_config(cls, config: UniMedVLConfig, tokenizer_dir: str | Path, seed: int = 0,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    zero_llm2vae: bool = True):
        """A randomly initialised model of the given geometry (for tests, and as a training start)."""
        tokenizer_dir = Path(tokenizer_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = UniMedVLModel(config)
            vae = build_vae(config.vae)
        model.init_weights(seed=seed, zero_llm2vae=zero_llm2vae)
        model.to(device=device, dtype=dtype)
        vae.to(device=device)
        if dtype != torch.float32:
            vae.to(dtype=dtype)
        vae.eval().requires_grad_(False)
        return cls(model, vae, load_tokenizer(tokenizer_dir), config, tokenizer_dir=tokenizer_dir,
                   name="randomly initialised")

    def save_pretrained(self, path: str | Path, weights_name: str = WEIGHT_FILES["ema"]) -> Path:
        """Write the released layout; ``from_pretrained(path)`` gives back the same model."""
        return save_checkpoint(path, self.config, {weights_name: self.model.state_dict()}, self.vae, self.tokenizer,
                               self.tokenizer_dir)

    @property
    def name(self) -> str:
        """What outputs call the weights: the checkpoint folder's name."""
        return self.provenance.name

    @name.setter
    def name(self, value: str) -> None:
        self.provenance.name = value

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.model.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        return self

    def encode_text(self, text: str) -> list[int]:
        """BPE ids of a text segment; the block's special tokens are added by the context."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def show_progress(self, progress: bool | None) -> bool:
        return self.progress if progress is None else progress

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"UniMedVL({self.name}, {n / 1e6:.1f}M parameters, device={self.device}, dtype={self.dtype})"
