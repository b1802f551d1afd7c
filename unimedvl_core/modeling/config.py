"""Model configuration in the released checkpoint layout.

A checkpoint folder holds ``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP) and, optionally, a
root ``config.json`` with the model-level settings the released scripts hard-code. The two sub-configs are
kept as the raw JSON dicts read from disk, so that ``save`` writes back exactly what was read and the
reference implementation can still read what we write.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .preprocessing import TransformSet

if TYPE_CHECKING:  # transformers is imported when a library config is built, not with this module
    from transformers import Qwen2Config, SiglipVisionConfig

__all__ = ["VAEConfig", "UniMedVLConfig", "ConfigError", "LLM_CONFIG_FILE", "VIT_CONFIG_FILE", "MODEL_CONFIG_FILE"]

LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
MODEL_CONFIG_FILE = "config.json"


class ConfigError(ValueError):
    """A checkpoint configuration is missing, unreadable or inconsistent."""


@dataclass
class VAEConfig:
    """FLUX-style autoencoder geometry (docs/checkpoint.md#geometry); the defaults are the released FLUX VAE."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers ``AutoencoderKL`` config (docs/checkpoint.md#vae)."""
        n = len(self.ch_mult)
        return dict(
            in_channels=self.in_channels,
            out_channels=self.out_ch,
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=[self.ch * m for m in self.ch_mult],
            layers_per_block=self.num_res_blocks,
            latent_channels=self.z_channels,
            act_fn="silu",
            norm_num_groups=32,
            sample_size=self.resolution,
            scaling_factor=self.scale_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
            force_upcast=True,
        )


# Values the released scripts hard-code; they apply when a checkpoint has no root config.json.
_MODEL_DEFAULTS: dict[str, Any] = dict(
    latent_patch_size=2,
    max_latent_size=64,
    vit_max_num_patch_per_side=70,
    connector_act="gelu_pytorch_tanh",
    interpolate_pos=False,
    timestep_shift=1.0,
)

# Optional settings of ours; absent in the released files.
_OPTIONAL = ("generation_size", "transforms")


@dataclass
class UniMedVLConfig:
    """Everything needed to rebuild the model from a checkpoint folder.

    Args:
        llm: contents of ``llm_config.json`` (Qwen2 geometry).
        vit: contents of ``vit_config.json`` (SigLIP geometry; ``num_hidden_layers`` as stored, one more
            than the number of layers built, see docs/checkpoint.md#loader-overrides).
        vae: autoencoder geometry.
        latent_patch_size, max_latent_size, vit_max_num_patch_per_side, connector_act, interpolate_pos,
        timestep_shift: model-level settings of the root ``config.json`` (docs/checkpoint.md#root-config).
        generation_size: optional default (height, width) for text-to-image; the released model uses 1024.
        transforms: optional resize rules for small models trained at small sizes; the released scripts'
            rules apply when absent.
    """

    llm: dict[str, Any]
    vit: dict[str, Any]
    vae: VAEConfig = field(default_factory=VAEConfig)
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    interpolate_pos: bool = False
    timestep_shift: float = 1.0
    generation_size: tuple[int, int] | None = None
    transforms: TransformSet = field(default_factory=TransformSet)

    def __post_init__(self):
        if isinstance(self.transforms, dict):
            self.transforms = TransformSet.from_dict(self.transforms)
        if self.interpolate_pos:
            raise ConfigError("interpolate_pos=true is not supported: the released model uses extrapolated positions")
        if self.latent_patch_size < 1 or self.max_latent_size < 1 or self.vit_max_num_patch_per_side < 1:
            raise ConfigError("latent_patch_size, max_latent_size and vit_max_num_patch_per_side must be positive")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in self.llm:
                raise ConfigError(f"{LLM_CONFIG_FILE} lacks '{key}'")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "intermediate_size"):
            if key not in self.vit:
                raise ConfigError(f"{VIT_CONFIG_FILE} lacks '{key}'")
        if self.vit["num_hidden_layers"] < 2:
            raise ConfigError(f"{VIT_CONFIG_FILE}: num_hidden_layers must be >= 2 (the last layer is dropped)")
        if self.llm["hidden_size"] % self.llm["num_attention_heads"]:
            raise ConfigError(f"{LLM_CONFIG_FILE}: hidden_size is not a multiple of num_attention_heads")
        if self.generation_size is not None:
            self.generation_size = tuple(int(s) for s in self.generation_size)

    # ----- derived geometry (docs/checkpoint.md#geometry) -----
    @property
    def hidden_size(self) -> int:
        return int(self.llm["hidden_size"])

    @property
    def head_dim(self) -> int:
        return int(self.llm.get("head_dim") or self.hidden_size // self.llm["num_attention_heads"])

    @property
    def latent_downsample(self) -> int:
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def vit_patch_size(self) -> int:
        return int(self.vit["patch_size"])

    @property
    def max_image_side(self) -> int:
        """Largest generated side in pixels: the latent position table bounds it."""
        return self.max_latent_size * self.latent_downsample

    @property
    def default_generation_size(self) -> tuple[int, int]:
        if self.generation_size is not None:
            return self.generation_size
        side = min(1024, self.max_image_side)
        return side, side

    # ----- library configs with the loader overrides of docs/checkpoint.md#loader-overrides -----
    def qwen2_config(self) -> Qwen2Config:
        from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

        cfg = Qwen2Config(**{k: v for k, v in self.llm.items() if k not in ("architectures",)})
        cfg.tie_word_embeddings = False
        return cfg

    def siglip_config(self) -> SiglipVisionConfig:
        from transformers.models.siglip.configuration_siglip import SiglipVisionConfig

        cfg = SiglipVisionConfig(**self.vit)
        cfg.num_hidden_layers = int(self.vit["num_hidden_layers"]) - 1
        cfg.vision_use_head = False
        return cfg

    # ----- files -----
    def model_settings(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _MODEL_DEFAULTS}
        out["vae_config"] = asdict(self.vae)
        if self.generation_size is not None:
            out["generation_size"] = list(self.generation_size)
        if self.transforms != TransformSet():
            out["transforms"] = self.transforms.to_dict()
        return out

    @classmethod
    def from_dir(cls, path: str | Path) -> "UniMedVLConfig":
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"checkpoint folder not found: {path}")
        llm = _read_json(path / LLM_CONFIG_FILE)
        vit = _read_json(path / VIT_CONFIG_FILE)
        settings = dict(_MODEL_DEFAULTS)
        vae = VAEConfig()
        extra: dict[str, Any] = {}
        root = path / MODEL_CONFIG_FILE
        if root.is_file():
            data = _read_json(root)
            for key, value in data.items():
                if key in _MODEL_DEFAULTS:
                    settings[key] = value
                elif key == "vae_config":
                    vae = _vae_from_dict(value, root)
                elif key in _OPTIONAL:
                    extra[key] = value
                # Other keys (e.g. upstream BAGEL's nested llm_config/vit_config) are not ours to interpret.
        return cls(llm=llm, vit=vit, vae=vae, **settings, **extra)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        llm = dict(self.llm)
        # Keep rope_theta top-level: readers on transformers 4.x (the reference) do not know rope_parameters.
        if "rope_theta" not in llm and isinstance(llm.get("rope_parameters"), dict):
            llm["rope_theta"] = llm["rope_parameters"].get("rope_theta")
        _write_json(path / LLM_CONFIG_FILE, llm)
        _write_json(path / VIT_CONFIG_FILE, self.vit)
        _write_json(path / MODEL_CONFIG_FILE, self.model_settings())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UniMedVLConfig":
        """Build from one dict holding ``llm_config``, ``vit_config`` and the root settings (a preset file).
        Keys starting with ``_`` are comments."""
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        try:
            llm = data.pop("llm_config")
            vit = data.pop("vit_config")
        except KeyError as err:
            raise ConfigError(f"model preset lacks {err}") from None
        vae = _vae_from_dict(data.pop("vae_config", {}), "preset")
        unknown = set(data) - set(_MODEL_DEFAULTS) - set(_OPTIONAL)
        if unknown:
            raise ConfigError(f"unknown model settings: {sorted(unknown)}")
        return cls(llm=llm, vit=vit, vae=vae, **{**_MODEL_DEFAULTS, **data})

    @classmethod
    def from_preset(cls, path: str | Path) -> "UniMedVLConfig":
        return cls.from_dict(_read_json(Path(path)))

    def to_dict(self) -> dict[str, Any]:
        return {"llm_config": dict(self.llm), "vit_config": dict(self.vit), **self.model_settings()}


def _vae_from_dict(value: Any, where: Any) -> VAEConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: vae_config must be an object")
    names = {f.name for f in fields(VAEConfig)}
    unknown = set(value) - names
    if unknown:
        raise ConfigError(f"{where}: unknown vae_config keys {sorted(unknown)}")
    return VAEConfig(**value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"missing {path.name} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
