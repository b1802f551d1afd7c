"""Checkpoint I/O: strict, read-only, lossless round trips in the released layout."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unimedvl_core import UniMedVL
from unimedvl_core.io.checkpoint import CheckpointError
from unimedvl_core.modeling.config import ConfigError

from .conftest import PARITY, PARITY_CKPT, random_model


def _digest(folder: Path) -> dict[str, tuple[str, float]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime) for p in sorted(folder.iterdir())}


def _outputs(model: UniMedVL):
    image = PARITY / "image448.png"
    out = model.answer(image, "Is there a lesion?", max_new_tokens=4, output_logits=True)
    gen = model.generate_image("two nodules", height=32, width=48, num_inference_steps=2, output_type="latent",
                               generator=torch.Generator().manual_seed(0), progress=False)
    return out.logits, gen


def test_save_then_load_gives_identical_weights_and_outputs(tmp_path):
    model = random_model(seed=7)
    model.save_pretrained(tmp_path / "saved")
    names = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"llm_config.json", "vit_config.json", "config.json", "ema.safetensors", "ae.safetensors",
            "tokenizer_config.json"} <= names
    loaded = UniMedVL.from_pretrained(tmp_path / "saved", device="cpu", progress=False)
    for (k, a), (k2, b) in zip(sorted(model.model.state_dict().items()), sorted(loaded.model.state_dict().items())):
        assert k == k2 and torch.equal(a, b)
    for a, b in zip(model.vae.state_dict().values(), loaded.vae.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_saved_files_use_the_released_key_names(tmp_path):
    random_model().save_pretrained(tmp_path)
    ema = load_file(str(tmp_path / "ema.safetensors"))
    ae = load_file(str(tmp_path / "ae.safetensors"))
    assert ema.keys() == load_file(str(PARITY_CKPT / "ema.safetensors")).keys()
    assert ae.keys() == load_file(str(PARITY_CKPT / "ae.safetensors")).keys()
    llm = json.loads((tmp_path / "llm_config.json").read_text())
    assert llm["rope_theta"] == 1e6  # readable by transformers 4.x Qwen2Config


def test_loading_never_writes_into_the_checkpoint_folder(parity_copy):
    before = _digest(parity_copy)
    parity_copy.chmod(0o555)
    try:
        UniMedVL.from_pretrained(parity_copy, dtype=torch.bfloat16, progress=False)
    finally:
        parity_copy.chmod(0o755)
    assert _digest(parity_copy) == before


def test_bf16_loading_casts_every_tensor(parity_copy):
    model = UniMedVL.from_pretrained(parity_copy, dtype="bfloat16", progress=False)
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    ref = load_file(str(parity_copy / "ema.safetensors"))
    name = "language_model.model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(model.model.state_dict()[name], ref[name].to(torch.bfloat16))
    assert model.answer(PARITY / "image448.png", "Any lesion?", max_new_tokens=3)  # runs end to end


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_key_is_named(parity_copy):
    _rewrite(parity_copy / "ema.safetensors", lambda t: t.pop("llm2vae.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: llm2vae\.bias"):
        UniMedVL.from_pretrained(parity_copy, progress=False)


def test_unexpected_key_is_named(parity_copy):
    _rewrite(parity_copy / "ema.safetensors", lambda t: t.__setitem__("language_model.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: language_model\.extra\.weight"):
        UniMedVL.from_pretrained(parity_copy, progress=False)


def test_wrong_shape_is_named(parity_copy):
    _rewrite(parity_copy / "ema.safetensors", lambda t: t.__setitem__("vae2llm.bias", torch.zeros(65)))
    with pytest.raises(CheckpointError, match=r"vae2llm\.bias \(65,\) != \(64,\)"):
        UniMedVL.from_pretrained(parity_copy, progress=False)


def test_vae_keys_are_checked_strictly(parity_copy):
    _rewrite(parity_copy / "ae.safetensors", lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.bias"):
        UniMedVL.from_pretrained(parity_copy, progress=False)


def test_ddp_prefixed_vae_keys_load(parity_copy):
    _rewrite(parity_copy / "ae.safetensors", lambda t: [t.__setitem__("module." + k, t.pop(k)) for k in list(t)])
    model = UniMedVL.from_pretrained(parity_copy, progress=False)
    ref = UniMedVL.from_pretrained(PARITY_CKPT, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.vae.state_dict().values(), ref.vae.state_dict().values()))


def test_vae_embedded_in_the_weights_file_takes_precedence(parity_copy):
    ae = load_file(str(parity_copy / "ae.safetensors"))
    ae["decoder.conv_out.bias"] = ae["decoder.conv_out.bias"] + 1.0
    _rewrite(parity_copy / "ema.safetensors", lambda t: t.update({"vae_model." + k: v for k, v in ae.items()}))
    model = UniMedVL.from_pretrained(parity_copy, progress=False)
    assert torch.equal(model.vae.decoder.conv_out.bias, ae["decoder.conv_out.bias"])


def test_model_safetensors_is_used_on_request_or_when_ema_is_absent(parity_copy):
    ema = load_file(str(parity_copy / "ema.safetensors"))
    ema["llm2vae.bias"] = ema["llm2vae.bias"] + 1
    save_file(ema, str(parity_copy / "model.safetensors"))
    chosen = UniMedVL.from_pretrained(parity_copy, weights="model", progress=False)
    assert torch.equal(chosen.model.llm2vae.bias, ema["llm2vae.bias"])
    os.remove(parity_copy / "ema.safetensors")
    fallback = UniMedVL.from_pretrained(parity_copy, progress=False)
    assert torch.equal(fallback.model.llm2vae.bias, ema["llm2vae.bias"])


def test_root_config_is_optional_and_released_values_apply(parity_copy):
    os.remove(parity_copy / "config.json")
    with pytest.raises(CheckpointError, match="does not match"):
        # without config.json the released FLUX VAE geometry applies, which this tiny ae does not have
        UniMedVL.from_pretrained(parity_copy, progress=False)
    from unimedvl_core.modeling.config import UniMedVLConfig

    config = UniMedVLConfig.from_dir(parity_copy)
    assert (config.latent_patch_size, config.max_latent_size, config.vit_max_num_patch_per_side) == (2, 64, 70)
    assert config.connector_act == "gelu_pytorch_tanh" and config.interpolate_pos is False
    assert config.vae.ch == 128 and config.vae.z_channels == 16


def test_corrupt_and_missing_files_give_clear_errors(parity_copy, tmp_path):
    (parity_copy / "ema.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read .*ema.safetensors"):
        UniMedVL.from_pretrained(parity_copy, progress=False)
    with pytest.raises(ConfigError, match="checkpoint folder not found"):
        UniMedVL.from_pretrained(tmp_path / "nowhere", progress=False)
    (parity_copy / "vit_config.json").unlink()
    with pytest.raises(ConfigError, match="missing vit_config.json"):
        UniMedVL.from_pretrained(parity_copy, progress=False)


def test_disk_offload_through_accelerate_gives_the_same_answer(tmp_path):
    ref = UniMedVL.from_pretrained(PARITY_CKPT, progress=False)
    device_map = {"": "cpu", "language_model.model.layers.1": "disk"}
    offloaded = UniMedVL.from_pretrained(PARITY_CKPT, device_map=device_map, offload_folder=tmp_path / "off",
                                         progress=False)
    assert any((tmp_path / "off").iterdir())
    layer = offloaded.model.language_model.model.layers[1]
    assert layer.mlp.up_proj.weight.device.type == "meta"  # really offloaded, loaded at forward time
    question = "Is there a lesion in the left lung? Answer yes or no."
    a = ref.answer(PARITY / "image448.png", question, max_new_tokens=5, output_logits=True)
    b = offloaded.answer(PARITY / "image448.png", question, max_new_tokens=5, output_logits=True)
    assert a.token_ids == b.token_ids
    assert torch.allclose(a.logits, b.logits, atol=1e-6)


def test_saved_tokenizer_config_is_readable_by_transformers_4(tmp_path):
    """docs/checkpoint.md#tokenizer-files: transformers 5 writes ``extra_special_tokens`` as a list, which the
    reference's transformers 4.49 cannot read; saved checkpoints carry the 4.x form with the same ids."""
    from unimedvl_core.modeling.tokenizer import load_tokenizer

    model = random_model()
    model.tokenizer.save_pretrained(str(tmp_path / "v5"))
    assert isinstance(json.loads((tmp_path / "v5" / "tokenizer_config.json").read_text())["extra_special_tokens"],
                      list)  # what transformers 5 writes (else this test checks nothing)
    from unimedvl_core.io.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "saved", model.config, {"ema.safetensors": model.model.state_dict()}, model.vae,
                    tokenizer_dir=tmp_path / "v5")
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    added = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())["added_tokens"]
    assert "extra_special_tokens" not in config
    assert {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()} == \
        {t["id"]: t["content"] for t in added}
    assert "<|vision_start|>" in config["additional_special_tokens"]
    source = json.loads((tmp_path / "v5" / "tokenizer_config.json").read_text())
    assert source.get("extra_special_tokens")  # the source folder is not rewritten
    text = "<|im_start|>user Is there a lesion?<|im_end|><|vision_start|><|vision_end|> héllo"
    assert load_tokenizer(tmp_path / "saved")(text).input_ids == model.tokenizer(text).input_ids
