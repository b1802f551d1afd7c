"""Components against the formulas and worked examples of the specification."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from unimedvl_core.inference.sampling import branches_needed, combine_guidance, guidance_scales, make_scheduler
from unimedvl_core.io.checkpoint import build_empty_model
from unimedvl_core.modeling.attention import packed_attention_mask
from unimedvl_core.modeling.config import UniMedVLConfig
from unimedvl_core.modeling.embeddings import TimestepEmbedder, grid_position_ids, sincos_2d_table
from unimedvl_core.modeling.kv_cache import KVCache
from unimedvl_core.modeling.preprocessing import ResizeRule, TransformSet
from unimedvl_core.modeling.siglip_navit import patchify_image
from unimedvl_core.modeling.vae import diffusers_to_flux, flux_to_diffusers, patchify_latent, unpatchify_latent

from .conftest import PARITY_CKPT

REPO = PARITY_CKPT.parents[3]


# ----- resize rules (worked examples of docs/preprocessing.md#examples) -----
RULES = TransformSet()
VAE, VQA_VIT, GEN_VIT = RULES.gen_vae, RULES.vqa_vit, RULES.gen_vit


@pytest.mark.parametrize("rule,size,expected", [
    (VAE, (512, 512), (512, 512)), (VQA_VIT, (512, 512), (518, 518)),
    (VAE, (300, 200), (304, 192)), (VQA_VIT, (300, 200), (560, 378)), (GEN_VIT, (300, 200), (574, 392)),
    (VAE, (4000, 1000), (1024, 256)), (VQA_VIT, (4000, 1000), (980, 252)),
])
def test_resize_rule_worked_examples(rule, size, expected):
    assert rule.target_size(*size) == expected


def test_resize_pixel_budget_scales_sides_by_the_root_of_the_area_ratio():
    rule = ResizeRule(max_size=10_000, min_size=16, stride=16, max_pixels=256 * 256)
    w, h = rule.target_size(1024, 1024)
    assert (w, h) == (256, 256)  # the reference's linear use of the area ratio would give 16x16


# ----- position ids and tables -----
def test_grid_position_ids_extrapolate():
    ids = grid_position_ids(3, 4, 70)
    assert ids.tolist() == [r * 70 + c for r in range(3) for c in range(4)]
    with pytest.raises(ValueError, match="exceeds"):
        grid_position_ids(71, 1, 70)


def test_sincos_table_columns_first_then_rows():
    grid, dim = 5, 16
    table = sincos_2d_table(grid, dim).double()
    omega = [1 / 10000 ** (k / (dim / 4)) for k in range(dim // 4)]
    r, c = 3, 2
    row = table[r * grid + c]
    q = dim // 4
    for k, w in enumerate(omega):
        assert row[k].item() == pytest.approx(math.sin(c * w), abs=1e-7)
        assert row[q + k].item() == pytest.approx(math.cos(c * w), abs=1e-7)
        assert row[2 * q + k].item() == pytest.approx(math.sin(r * w), abs=1e-7)
        assert row[3 * q + k].item() == pytest.approx(math.cos(r * w), abs=1e-7)


def test_parity_checkpoint_tables_are_the_sincos_formula():
    state = load_file(str(PARITY_CKPT / "ema.safetensors"))
    assert torch.allclose(state["latent_pos_embed.pos_embed"], sincos_2d_table(64, 64), atol=1e-6)
    assert torch.allclose(state["vit_pos_embed.pos_embed"], sincos_2d_table(70, 64), atol=1e-6)


def test_timestep_embedding_is_cos_first():
    emb = TimestepEmbedder(8, frequency_size=8)
    with torch.no_grad():
        emb.mlp[0].weight.copy_(torch.eye(8))
        emb.mlp[0].bias.zero_()
    t = torch.tensor([0.37])
    freqs = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float32) / 4)
    expected = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)])
    first_linear = emb.mlp[0](torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1))
    from diffusers.models.embeddings import get_timestep_embedding

    got = get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0)[0]
    assert torch.equal(got, expected)
    assert torch.allclose(emb(t), emb.mlp[2](emb.mlp[1](first_linear)))


# ----- patchification orders -----
def test_vit_patch_vectors_are_row_col_py_px_channel():
    p = 2
    image = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    patches = patchify_image(image, p)
    assert patches.shape == (2 * 3, p * p * 3)
    # patch (r=1, c=2), inner (py=1, px=0), channel 2
    vec = patches[1 * 3 + 2]
    assert vec[(1 * p + 0) * 3 + 2] == image[2, 1 * p + 1, 2 * p + 0]


def test_latent_patchify_round_trip_and_order():
    latent = torch.randn(4, 6, 8)
    tokens = patchify_latent(latent, 2)
    assert tokens.shape == (12, 16)
    assert torch.equal(unpatchify_latent(tokens, 3, 4, 2), latent)
    assert tokens[1 * 4 + 3, (1 * 2 + 0) * 4 + 2] == latent[2, 1 * 2 + 1, 3 * 2 + 0]


# ----- sampler -----
@pytest.mark.parametrize("n", [2, 3, 10, 50])
def test_schedule_is_the_shifted_linspace_of_the_reference(n):
    s = 3.0
    scheduler = make_scheduler(n - 1, s)
    t = torch.linspace(1, 0, n)
    t = s * t / (1 + (s - 1) * t)
    assert torch.equal(scheduler.sigmas.float(), t)
    assert len(scheduler.timesteps) == n - 1


def test_default_interval_covers_41_of_49_steps():
    scheduler = make_scheduler(49, 3.0)
    active = [guidance_scales(t, (0.4, 1.0), 4.0, 1.0)[0] > 1 for t in scheduler.sigmas[:-1]]
    assert sum(active) == 41


def test_euler_step_matches_reference_update():
    scheduler = make_scheduler(4, 3.0)
    x = torch.randn(5, 8)
    v = torch.randn(5, 8)
    t0, t1 = scheduler.sigmas[0], scheduler.sigmas[1]
    out = scheduler.step(v, scheduler.timesteps[0], x).prev_sample
    assert torch.equal(out, x - v * (t0 - t1))


def test_guidance_interval_is_compared_in_float32():
    t = torch.tensor(0.4, dtype=torch.float32)  # float32(0.4) is slightly above the double 0.4
    assert guidance_scales(t, (0.4, 1.0), 4.0, 2.0) == (1.0, 1.0)
    assert guidance_scales(torch.tensor(1.0), (0.4, 1.0), 4.0, 2.0) == (4.0, 2.0)


def test_branches_needed():
    assert branches_needed(1.0, 3.0) == 1
    assert branches_needed(4.0, 1.0) == 2
    assert branches_needed(4.0, 1.5) == 3


def _cfg_cases():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(6, 4, generator=g) for _ in range(3)]


def test_guidance_global_renorm():
    vc, vt, vi = _cfg_cases()
    s_t, s_i = 4.0, 2.0
    v1 = vt + s_t * (vc - vt)
    v2 = vi + s_i * (v1 - vi)
    expected = v2 * min(max(vc.norm().item() / (v2.norm().item() + 1e-8), 0.0), 1.0)
    assert torch.allclose(combine_guidance(vc, vt, vi, s_t, s_i, "global"), expected, atol=1e-6)


def test_guidance_channel_renorm_is_per_token():
    vc, vt, _ = _cfg_cases()
    v1 = vt + 3.0 * (vc - vt)
    out = combine_guidance(vc, vt, None, 3.0, 1.0, "channel")
    for i in range(6):
        scale = min(vc[i].norm().item() / (v1[i].norm().item() + 1e-8), 1.0)
        assert torch.allclose(out[i], v1[i] * scale, atol=1e-6)


def test_guidance_text_channel_renorms_before_image_guidance():
    vc, vt, vi = _cfg_cases()
    v1 = vt + 4.0 * (vc - vt)
    scale = (vc.norm(dim=-1, keepdim=True) / (v1.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0.0, 1.0)
    expected = vi + 2.0 * (v1 * scale - vi)
    assert torch.allclose(combine_guidance(vc, vt, vi, 4.0, 2.0, "text_channel"), expected, atol=1e-6)


def test_guidance_renorm_min_and_disabled_text_scale():
    vc, vt, vi = _cfg_cases()
    big = combine_guidance(vc, vt, None, 50.0, 1.0, "global", renorm_min=1.0)
    assert torch.allclose(big, vt + 50.0 * (vc - vt))  # clamp(min=1, max=1): no rescaling
    assert torch.equal(combine_guidance(vc, vt, vi, 1.0, 3.0, "global"), vc)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        combine_guidance(vc, vt, vi, 4.0, 1.0, "bogus")


# ----- attention masks (docs/token-layout.md#training-mask) -----
def test_packed_mask_rules():
    # text (causal, 3) | ViT (full, 2) | noisy VAE (noise, 2) | text (causal, 2)
    mask = packed_attention_mask([3, 2, 2, 2], ["causal", "full", "noise", "causal"])
    T, V, N, U = range(0, 3), range(3, 5), range(5, 7), range(7, 9)
    assert mask[1, 0] and mask[1, 1] and not mask[1, 2]          # causal within text
    assert all(mask[i, j] for i in V for j in [*T, *V])          # full split sees earlier + all of itself
    assert all(mask[i, j] for i in N for j in [*T, *V, *N])      # noise split sees earlier + itself
    assert not any(mask[i, j] for i in U for j in N)             # nobody outside sees noise tokens
    assert all(mask[i, j] for i in U for j in [*T, *V])
    assert mask[8, 7] and not mask[7, 8]
    assert not any(mask[i, j] for i in [*T, *V] for j in N)


def test_cache_query_mask_is_bottom_right_causal_per_row():
    cache = KVCache(1, 2, 10, 1, 4, torch.float32, "cpu")
    cache.lengths = [3, 1]
    visible = cache.query_mask(2, causal=True) == 0
    assert visible.shape == (2, 1, 2, 5)
    assert visible[0, 0, 0].tolist() == [True, True, True, True, False]
    assert visible[0, 0, 1].tolist() == [True] * 5
    assert visible[1, 0, 0].tolist() == [True, True, False, False, False]
    full = cache.query_mask(2, causal=False) == 0
    assert full[1, 0, 0].tolist() == [True, True, True, False, False]
    cache.lengths = [4, 4]
    assert cache.query_mask(3, causal=False) is None


# ----- checkpoint geometry and keys -----
def test_released_geometry_has_the_spec_key_count_and_elements():
    config = UniMedVLConfig.from_preset(REPO / "configs" / "models" / "released_14b.json")
    state = build_empty_model(config).state_dict()
    assert len(state) == 1223
    assert sum(v.numel() for v in state.values()) == 14_607_260_128
    assert sum(k.startswith("language_model.") for k in state) == 788
    assert sum(k.startswith("vit_model.") for k in state) == 421
    assert tuple(state["vit_model.vision_model.embeddings.patch_embedding.weight"].shape) == (1152, 588)
    assert tuple(state["language_model.model.layers.27.self_attn.k_proj_moe_gen.weight"].shape) == (512, 3584)
    assert tuple(state["latent_pos_embed.pos_embed"].shape) == (4096, 3584)
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc1.weight" not in state  # 27 in JSON, 26 built


def test_vae_key_mapping_is_the_inverse_of_the_diffusers_converter():
    config = UniMedVLConfig.from_dir(PARITY_CKPT)
    flux = load_file(str(PARITY_CKPT / "ae.safetensors"))
    back = diffusers_to_flux(flux_to_diffusers(flux, config.vae), config.vae)
    assert back.keys() == flux.keys()
    assert all(torch.equal(back[k], flux[k]) for k in flux)
