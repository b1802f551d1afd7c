"""``UniMedVL``: load a checkpoint in the released layout and read or make medical images with it.

    model = UniMedVL.from_pretrained("/path/to/UniMedVL")
    model.answer("chest.dcm", "Is there a pleural effusion?")
    model.generate_image("Chest X-ray with a right lower lobe consolidation", height=512, width=512)
    model.edit_image("t2.nii.gz", "Translate this T2 MRI image into the corresponding FLAIR image.")
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import (
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
from .config import UniMedVLConfig
from .inference.context import Context, image_block_len, text_block_len
from .inference.image_generation import Branch, GuidanceSettings, denoise
from .inference.text_generation import TextOutput, decode_text
from .medical_io import MedicalImage, read_image
from .modeling.unimedvl import UniMedVLModel
from .modeling.vae import build_vae, patchify_latent, unpatchify_latent, vae_decode, vae_encode
from .preprocessing import from_model_tensor, resize_to_rule, to_model_tensor
from .prompts import (
    EDIT_ANALYSIS,
    EDIT_ANALYSIS_JOINER,
    report_prompt,
    staining_instruction,
    super_resolution_instruction,
    translation_instruction,
)
from .sampling import RENORM_TYPES
from .synthetic import label_synthetic
from .tokenizer import SpecialTokenIds, load_tokenizer

__all__ = ["UniMedVL", "CounterfactualResult", "ImageInput", "OUTPUT_TYPES"]

log = logging.getLogger(__name__)

ImageInput = Any  # PIL image, numpy array, path (PNG/JPEG/DICOM/NIfTI/DICOM folder), pydicom Dataset, MedicalImage
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class CounterfactualResult:
    image: Any
    explanation: str


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class UniMedVL:
    """The model with its VAE and tokenizer, and the tasks users call.

    Args:
        model: the transformer (LLM, ViT, heads) whose state dict is ``ema.safetensors``.
        vae: the FLUX autoencoder (diffusers ``AutoencoderKL``).
        tokenizer: Qwen2-style tokenizer holding the special tokens of spec 4.1.
        config: the checkpoint configuration.
        tokenizer_dir: where the tokenizer files came from (copied as they are by ``save_pretrained``).
        name: a short description printed in outputs (e.g. the checkpoint folder name).
    """

    def __init__(self, model: UniMedVLModel, vae, tokenizer, config: UniMedVLConfig,
                 tokenizer_dir: Path | None = None, name: str = "UniMedVL"):
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.config = config
        self.tokenizer_dir = tokenizer_dir
        self.name = name
        self.special = SpecialTokenIds.from_tokenizer(tokenizer)
        vocab = config.llm["vocab_size"]
        too_big = [t for t in (self.special.bos, self.special.eos, self.special.vision_start, self.special.vision_end)
                   if t >= vocab]
        if too_big:
            raise CheckpointError(f"tokenizer ids {too_big} do not fit the embedding table of {vocab} rows")
        self.progress = True
        self.model.eval()

    # ------------------------------------------------------------------------------------------------------
    # construction, loading, saving

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, weights: str = "ema",
                        device_map: str | dict | None = None, max_memory: dict | None = None,
                        offload_folder: str | Path | None = None, progress: bool = True) -> "UniMedVL":
        """Load a checkpoint folder in the released layout (spec 1.1), strictly.

        Args:
            path: folder with ``llm_config.json``, ``vit_config.json``, ``ema.safetensors`` (or
                ``model.safetensors``), ``ae.safetensors``, tokenizer files and optionally ``config.json``.
            device: where to run; CUDA when available, else CPU.
            dtype: parameter dtype; bfloat16 on GPU and float32 on CPU by default.
            weights: ``"ema"`` (``ema.safetensors``, the default) or ``"model"`` (``model.safetensors``).
            device_map: ``"auto"`` (or an accelerate device map) to spread layers over GPUs and offload the
                rest to CPU or disk; ``max_memory`` bounds each device as in accelerate.
            offload_folder: where disk-offloaded weights go (a temporary folder by default; never the
                checkpoint folder).
        """
        path = Path(path)
        device = torch.device(device) if device is not None else default_device()
        dtype = _as_dtype(dtype) if dtype is not None else default_dtype(device)
        if weights not in WEIGHT_FILES:
            raise ValueError(f"weights must be one of {sorted(WEIGHT_FILES)}, got {weights!r}")
        config = UniMedVLConfig.from_dir(path)
        tokenizer = load_tokenizer(path)
        weights_path = path / WEIGHT_FILES[weights]
        if not weights_path.is_file() and weights == "ema" and (path / WEIGHT_FILES["model"]).is_file():
            log.info("no ema.safetensors in %s; using model.safetensors", path.name)
            weights_path = path / WEIGHT_FILES["model"]
        model = build_empty_model(config)
        if isinstance(device_map, str):
            if device_map not in ("auto", "balanced", "sequential"):
                raise ValueError(f"device_map must be 'auto', 'balanced', 'sequential' or a dict, got {device_map!r}")
            device_map = infer_device_map(model, dtype, max_memory)
        elif device_map is not None:
            device_map = normalize_device_map(model, device_map)
        if device_map is not None and offload_folder is None and "disk" in device_map.values():
            offload_folder = tempfile.mkdtemp(prefix="unimedvl-offload-")
        if offload_folder is not None:
            if Path(offload_folder).resolve() == path.resolve():
                raise ValueError("offload_folder must not be the checkpoint folder")
            Path(offload_folder).mkdir(parents=True, exist_ok=True)
        embedded_vae = load_model_weights(model, weights_path, dtype, device, device_map,
                                          str(offload_folder) if offload_folder else None, progress)
        vae = load_vae(config, path / VAE_FILE, dtype, device, override=embedded_vae or None)
        return cls(model, vae, tokenizer, config, tokenizer_dir=path, name=path.name)

    @classmethod
    def from_config(cls, config: UniMedVLConfig, tokenizer_dir: str | Path, seed: int = 0,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    zero_llm2vae: bool = True) -> "UniMedVL":
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
        """Write the released layout; ``UniMedVL.from_pretrained(path)`` gives back the same model."""
        return save_checkpoint(path, self.config, {weights_name: self.model.state_dict()}, self.vae, self.tokenizer,
                               self.tokenizer_dir)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "UniMedVL":
        self.model.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        return self

    # ------------------------------------------------------------------------------------------------------
    # input helpers

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    @staticmethod
    def load_image(image: ImageInput) -> MedicalImage:
        return read_image(image)

    def _vit_input(self, pil: Image.Image, rule) -> torch.Tensor:
        return to_model_tensor(resize_to_rule(pil, rule))

    def _vit_tokens(self, tensor: torch.Tensor) -> int:
        p = self.config.vit_patch_size
        return (tensor.shape[1] // p) * (tensor.shape[2] // p)

    # ------------------------------------------------------------------------------------------------------
    # understanding

    @torch.inference_mode()
    def answer(self, image: ImageInput | Sequence[ImageInput], question: str, max_new_tokens: int = 512,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
               stop_token_ids: Sequence[int] | None = None, streamer: Callable[[str], None] | None = None,
               generator: torch.Generator | None = None, output_logits: bool = False,
               return_dict: bool = False) -> str | TextOutput:
        """Answer a question about one image (or several, in order): the images as ViT blocks, then the
        question as a text block, then decoding from ``<|im_start|>`` (the reference's ``chat``).

        Args:
            streamer: called with each new piece of text as it is decoded.
            stop_token_ids: ids that end decoding (default ``<|im_end|>``); not part of the answer.
            output_logits, return_dict: return a ``TextOutput`` with the token ids and, if asked, one row of
                logits per decoding step.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        tensors = [self._vit_input(read_image(img).to_pil(), self.config.transforms.vqa_vit) for img in images]
        ids = self._encode(question)
        capacity = sum(image_block_len(self._vit_tokens(t)) for t in tensors) + text_block_len(ids) + 1 + max_new_tokens
        context = Context(self.model, self.special, capacity)
        for tensor in tensors:
            context.add_vit_image(tensor)
        out = decode_text(context, ids, self.tokenizer, max_new_tokens, do_sample, temperature, top_p,
                          stop_token_ids, streamer, generator, output_logits)
        return out if return_dict or output_logits else out.text

    def generate_report(self, image: ImageInput, prompt: str | None = None, modality: str | None = None,
                        max_new_tokens: int = 512, **kwargs) -> str | TextOutput:
        """Draft a report for an image; the prompt names the modality when known (DICOM Modality)."""
        if prompt is None:
            if modality is None:
                loaded = read_image(image)
                modality, image = loaded.modality, loaded
            prompt = report_prompt(modality)
        return self.answer(image, prompt, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------------------
    # generation

    def _check_size(self, height: int, width: int) -> None:
        d, top = self.config.latent_downsample, self.config.max_image_side
        for name, side in (("height", height), ("width", width)):
            if not isinstance(side, (int, np.integer)) or side < d or side > top or side % d:
                raise ValueError(f"{name} must be a multiple of {d} between {d} and {top}, got {side!r}")

    def _noise_tokens(self, height: int, width: int, latents: torch.Tensor | None,
                      generator: torch.Generator | None) -> torch.Tensor:
        z, down, p = self.config.vae.z_channels, self.config.vae.downsample, self.config.latent_patch_size
        shape = (z, height // down, width // down)
        if latents is None:
            device = generator.device if generator is not None else torch.device("cpu")
            latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = torch.as_tensor(latents)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} (z_channels, H/{down}, W/{down}), "
                                 f"got {tuple(latents.shape)}")
        return patchify_latent(latents.float(), p)

    def _size_from_latents(self, latents, height, width) -> tuple[int | None, int | None]:
        if latents is not None and height is None and width is None:
            down = self.config.vae.downsample
            return int(latents.shape[-2]) * down, int(latents.shape[-1]) * down
        return height, width

    def _finish(self, tokens: torch.Tensor, height: int, width: int, output_type: str, task: str, description: str):
        p, d = self.config.latent_patch_size, self.config.latent_downsample
        latent = unpatchify_latent(tokens, height // d, width // d, p)
        if output_type == "latent":
            return latent.cpu()
        with torch.inference_mode():
            image = vae_decode(self.vae, latent[None].to(self.device), self.config.vae)[0]
        pixels = from_model_tensor(image)
        if output_type == "np":
            return pixels
        if output_type == "pt":
            return torch.from_numpy(pixels).permute(2, 0, 1)
        return label_synthetic(Image.fromarray(pixels), task, description)

    @staticmethod
    def _check_guidance(settings: GuidanceSettings, output_type: str) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if settings.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {settings.cfg_renorm_type!r}")
        lo, hi = settings.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1, got {settings.cfg_interval}")
        if settings.num_inference_steps < 1 or settings.timestep_shift <= 0:
            raise ValueError("num_inference_steps must be >= 1 and timestep_shift > 0")

    @torch.inference_mode()
    def generate_image(self, prompt: str, height: int | None = None, width: int | None = None,
                       num_inference_steps: int = 49, cfg_text_scale: float = 4.0, cfg_img_scale: float = 1.0,
                       cfg_interval: tuple[float, float] = (0.4, 1.0), timestep_shift: float = 3.0,
                       cfg_renorm_type: str = "global", cfg_renorm_min: float = 0.0,
                       generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                       output_type: str = "pil", progress: bool | None = None,
                       callback: Callable[[int, int], None] | None = None):
        """Text-to-image (spec 3.11/4.2). The default 49 steps is the reference's 50-timestep schedule.

        Args:
            height, width: output size, multiples of 16 up to ``max_latent_size * 16`` (1024 for the
                released model; its default).
            generator, latents: the initial noise is ``latents`` (shape (z_channels, H/8, W/8)) or drawn
                from ``generator``.
            output_type: ``"pil"`` (labelled synthetic), ``"np"`` (uint8 HxWx3), ``"pt"`` (uint8 3xHxW) or
                ``"latent"`` (the final VAE latents, (z_channels, H/8, W/8)).
            callback: called as ``callback(step, total)`` after each step; raise inside it to cancel.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        height, width = self._size_from_latents(latents, height, width)
        if height is None or width is None:
            default_h, default_w = self.config.default_generation_size
            height, width = height or default_h, width or default_w
        self._check_size(height, width)
        settings = GuidanceSettings(num_inference_steps, cfg_text_scale, cfg_img_scale, tuple(cfg_interval),
                                    timestep_shift, cfg_renorm_type, cfg_renorm_min)
        self._check_guidance(settings, output_type)
        noise = self._noise_tokens(height, width, latents, generator)
        ids = self._encode(prompt)
        cond = Context(self.model, self.special, text_block_len(ids))
        cond.add_text(ids)
        # Text-unconditional: the empty context. Image-unconditional: the same tokens as the conditional
        # context when there is no image (spec 4.2).
        branches = [Branch.of(cond), Branch(cond, 0, 0), Branch.of(cond)][: settings.max_branches()]
        h, w = height // self.config.latent_downsample, width // self.config.latent_downsample
        tokens = denoise(cond, branches, h, w, noise, settings, self._progress(progress), callback)
        return self._finish(tokens, height, width, output_type, "text-to-image", prompt)

    def _progress(self, progress: bool | None) -> bool:
        return self.progress if progress is None else progress

    def _condition_inputs(self, image: ImageInput, vae_posterior: str, generator) -> tuple:
        """The input image as the editing script feeds it: resized by the VAE rule, VAE-encoded, and the
        resized image resized again by the ViT rule (spec 3.12)."""
        if vae_posterior not in ("mean", "sample"):
            raise ValueError(f"vae_posterior must be 'mean' or 'sample', got {vae_posterior!r}")
        pil = read_image(image).to_pil()
        vae_pil = resize_to_rule(pil, self.config.transforms.gen_vae)
        vit_tensor = self._vit_input(vae_pil, self.config.transforms.gen_vit)
        latent = vae_encode(self.vae, to_model_tensor(vae_pil)[None].to(self.device), self.config.vae,
                            sample=vae_posterior == "sample", generator=generator)[0]
        p = self.config.latent_patch_size
        lh, lw = latent.shape[1] // p, latent.shape[2] // p
        return vae_pil, patchify_latent(latent, p), (lh, lw), vit_tensor

    @torch.inference_mode()
    def _edit(self, image: ImageInput, instruction: str, height: int | None, width: int | None,
              settings: GuidanceSettings, generator, latents, vae_posterior: str, analyze_first: bool,
              output_type: str, progress, callback, task: str, explain_tokens: int = 0):
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("instruction must be a non-empty string")
        self._check_guidance(settings, output_type)
        vae_pil, cond_tokens, (lh, lw), vit_tensor = self._condition_inputs(image, vae_posterior, generator)
        height, width = self._size_from_latents(latents, height, width)
        height = height or vae_pil.height
        width = width or vae_pil.width
        self._check_size(height, width)
        if analyze_first:
            analysis = self.answer(vae_pil, EDIT_ANALYSIS.format(instruction=instruction), max_new_tokens=800)
            instruction = instruction + EDIT_ANALYSIS_JOINER + analysis
        noise = self._noise_tokens(height, width, latents, generator)
        ids = self._encode(instruction)
        vit_len = image_block_len(self._vit_tokens(vit_tensor))
        cond = Context(self.model, self.special, image_block_len(lh * lw) + vit_len + text_block_len(ids)
                       + (1 + explain_tokens if explain_tokens else 0))
        cond.add_vae_latents(cond_tokens, lh, lw)
        cond.add_vit_image(vit_tensor)
        image_only = Branch.of(cond)  # text-unconditional: the image blocks without the instruction
        cond.add_text(ids)
        branches = [Branch.of(cond), image_only]
        needed = settings.max_branches()
        if needed == 3:  # image-unconditional: the instruction alone
            text_only = Context(self.model, self.special, text_block_len(ids))
            text_only.add_text(ids)
            branches.append(Branch.of(text_only))
        d = self.config.latent_downsample
        tokens = denoise(cond, branches[:needed], height // d, width // d, noise, settings,
                         self._progress(progress), callback)
        result = self._finish(tokens, height, width, output_type, task, instruction)
        if explain_tokens:
            # The explanation follows the target image, which (as in training) no later token attends to.
            return result, decode_text(cond, None, self.tokenizer, explain_tokens).text
        return result

    def edit_image(self, image: ImageInput, instruction: str, height: int | None = None, width: int | None = None,
                   num_inference_steps: int = 49, cfg_text_scale: float = 4.0, cfg_img_scale: float = 2.0,
                   cfg_interval: tuple[float, float] = (0.0, 1.0), timestep_shift: float = 3.0,
                   cfg_renorm_type: str = "text_channel", cfg_renorm_min: float = 0.0,
                   generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                   vae_posterior: str = "mean", analyze_first: bool = False, output_type: str = "pil",
                   progress: bool | None = None, callback: Callable[[int, int], None] | None = None):
        """Image-to-image generation from an instruction (spec 3.10, 3.12): the input image as a VAE block
        and a ViT block, then the instruction, then the image is generated. The output size defaults to the
        input resized by the VAE rule. Defaults follow the released editing script.

        Args:
            vae_posterior: ``"mean"`` (deterministic, default) or ``"sample"`` (as the reference does) for
                encoding the input image.
            analyze_first: first let the model describe an editing strategy and append it to the
                instruction (the editing script's describe-first variant).
        """
        settings = GuidanceSettings(num_inference_steps, cfg_text_scale, cfg_img_scale, tuple(cfg_interval),
                                    timestep_shift, cfg_renorm_type, cfg_renorm_min)
        return self._edit(image, instruction, height, width, settings, generator, latents, vae_posterior,
                          analyze_first, output_type, progress, callback, task="image-to-image")

    # ------------------------------------------------------------------------------------------------------
    # named image-to-image tasks

    def super_resolve(self, image: ImageInput, scale: int = 4, instruction: str | None = None, **kwargs):
        """x2/x4 super-resolution: the input is upsampled (bicubic) to the target size, which must fit the
        model, and the model restores detail at that size."""
        if scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, got {scale}")
        loaded = read_image(image)
        pil = loaded.to_pil()
        d = self.config.latent_downsample
        target = [max(d, round(s * scale / d) * d) for s in pil.size]
        if max(target) > self.config.max_image_side:
            raise ValueError(f"a {pil.width}x{pil.height} input upscaled {scale}x exceeds the largest output side "
                             f"({self.config.max_image_side}); crop or downsample it first")
        upsampled = pil.resize(tuple(target), Image.Resampling.BICUBIC)
        instruction = instruction or super_resolution_instruction(scale, loaded.modality)
        kwargs.setdefault("height", target[1])
        kwargs.setdefault("width", target[0])
        return self._named_edit(upsampled, instruction, "super-resolution", kwargs)

    def virtual_stain(self, image: ImageInput, stain: str = "IHC", instruction: str | None = None, **kwargs):
        """Virtual staining of an H&E pathology image (to IHC by default)."""
        return self._named_edit(image, instruction or staining_instruction(stain), "virtual-staining", kwargs)

    def translate_contrast(self, image: ImageInput, source: str = "T2", target: str = "FLAIR",
                           instruction: str | None = None, **kwargs):
        """MRI contrast translation, e.g. T2 -> FLAIR or FLAIR -> T2."""
        return self._named_edit(image, instruction or translation_instruction(source, target),
                                "contrast-translation", kwargs)

    def counterfactual_edit(self, image: ImageInput, instruction: str, max_explanation_tokens: int = 256,
                            **kwargs) -> CounterfactualResult:
        """A counterfactual edit (e.g. "remove the pleural effusion") and the model's explanation text."""
        settings, rest = self._edit_settings(kwargs)
        image_out, text = self._edit(image, instruction, settings=settings, task="counterfactual",
                                     explain_tokens=max_explanation_tokens, **rest)
        return CounterfactualResult(image_out, text)

    _EDIT_DEFAULTS = dict(height=None, width=None, generator=None, latents=None, vae_posterior="mean",
                          analyze_first=False, output_type="pil", progress=None, callback=None)

    def _edit_settings(self, kwargs: dict) -> tuple[GuidanceSettings, dict]:
        names = GuidanceSettings.__dataclass_fields__
        unknown = set(kwargs) - set(names) - set(self._EDIT_DEFAULTS)
        if unknown:
            raise TypeError(f"unexpected arguments {sorted(unknown)}")
        settings = GuidanceSettings(**{**dict(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                                              cfg_renorm_type="text_channel"),
                                       **{k: v for k, v in kwargs.items() if k in names}})
        rest = {**self._EDIT_DEFAULTS, **{k: v for k, v in kwargs.items() if k not in names}}
        return settings, rest

    def _named_edit(self, image, instruction: str, task: str, kwargs: dict):
        settings, rest = self._edit_settings(kwargs)
        return self._edit(image, instruction, settings=settings, task=task, **rest)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"UniMedVL({self.name}, {n / 1e6:.1f}M parameters, device={self.device}, dtype={self.dtype})"


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
