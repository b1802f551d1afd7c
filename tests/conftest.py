"""Shared fixtures: the parity checkpoint written by the published implementation, and tiny random models."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from unimedvl_core.modeling.config import UniMedVLConfig, VAEConfig

FIXTURES = Path(__file__).parent / "fixtures"
PARITY = FIXTURES / "parity"
PARITY_CKPT = PARITY / "tiny_s0"

torch.set_num_threads(2)


def tiny_config(**overrides) -> UniMedVLConfig:
    """A model of the released architecture at a tiny size (as in transformers' model testers)."""
    llm = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=652, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
               max_position_embeddings=32768, tie_word_embeddings=False)
    vit = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=2,
               num_hidden_layers=3, patch_size=14, image_size=980, num_channels=3, hidden_act="gelu_pytorch_tanh",
               layer_norm_eps=1e-6, attention_dropout=0.0)
    llm.update(overrides.pop("llm", {}))
    vae = overrides.pop("vae", None) or VAEConfig(resolution=64, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1,
                                                  z_channels=4)
    return UniMedVLConfig(llm=llm, vit=vit, vae=vae, **overrides)


def random_model(seed: int = 0, **config_overrides):
    from unimedvl_core import UniMedVL

    # llm2vae random (not zero) so that guidance and sampler tests see real velocities.
    return UniMedVL.from_config(tiny_config(**config_overrides), PARITY_CKPT, seed=seed, zero_llm2vae=False)


# Parity runs on every device present: the CPU always, CUDA on a machine with a GPU (fp32 there too, with
# TF32 off, since the published outputs are fp32).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(scope="session", params=DEVICES)
def parity_model(request):
    from unimedvl_core import UniMedVL

    if request.param == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return UniMedVL.from_pretrained(PARITY_CKPT, device=request.param, dtype=torch.float32, progress=False)


@pytest.fixture(scope="session")
def tiny_model():
    model = random_model()
    model.progress = False
    return model


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded phantom-trained default model (the demo's), loaded once."""
    from unimedvl_core.inference.embedded import load_default_model

    model = load_default_model(progress=False)
    model.progress = False
    return model


@pytest.fixture
def parity_copy(tmp_path) -> Path:
    """A writable copy of the parity checkpoint for tests that alter files."""
    dst = tmp_path / "ckpt"
    shutil.copytree(PARITY_CKPT, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def dciodvfy_errors(path) -> list[str]:
    """dciodvfy's error lines for a file; Debian's 2022 dciodvfy does not know SyntheticData (0008,001C),
    so that error is expected and left out. Skips the test when dicom3tools is not installed."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) not installed")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error") and "0x0008,0x001c" not in line.lower()]
