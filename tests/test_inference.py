"""Inference paths against independent recomputations: cache vs full sequence, batched vs separate
guidance branches, and the worked token layouts of docs/token-layout.md."""

from __future__ import annotations

import torch

from unimedvl_core.inference.context import Context, image_routing
from unimedvl_core.inference.image_generation import Branch, GuidanceSettings, denoise
from unimedvl_core.inference.sampling import combine_guidance, guidance_scales, make_scheduler
from unimedvl_core.modeling.packing import PackBuilder
from unimedvl_core.modeling.vae import patchify_latent, vae_encode


def _image(h=56, w=70, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1


def test_cached_decoding_equals_full_recompute(tiny_model):
    m = tiny_model
    image = _image()
    question = m.encode_text("Is there a nodule in the left lung?")
    context = Context(m.model, m.special, 200)
    context.add_vit_image(image)
    from unimedvl_core.inference.text_generation import decode_text

    out = decode_text(context, question, m.tokenizer, max_new_tokens=6, output_logits=True,
                      stop_token_ids=[-1])
    builder = PackBuilder(m.special)
    builder.add_vit_image(image, m.config.vit_patch_size)
    builder.add_text(question)
    builder.add_open_text([m.special.im_start, *out.token_ids[:-1]])
    pack = builder.build()
    with torch.inference_mode():
        hidden = m.model.forward_pack(pack)
        logits = m.model.text_logits(hidden[-len(out.token_ids):]).float()
    assert torch.allclose(logits, out.logits, atol=2e-5), (logits - out.logits).abs().max()


def test_vqa_layout_positions_and_cache_lengths(tiny_model):
    """The worked VQA layout (docs/token-layout.md): one 518x518 image -> 37*37 ViT tokens at position 0
    (kv 1371), the text at positions 1..n+2, decoding starts at n+3."""
    m = tiny_model
    ids = m.encode_text("Describe the image.")
    n = len(ids)
    context = Context(m.model, m.special, Context.capacity_for(text=[n], images=[37 * 37]))
    context.add_vit_image(torch.zeros(3, 518, 518))
    assert (context.length, context.rope) == (1371, 1)
    context.add_text(ids)
    assert (context.length, context.rope) == (1371 + n + 2, n + 3)


def test_edit_layout_positions(tiny_model):
    """VAE block at 0, ViT block at 1, text at 2..n+3, noisy block at n+4; cfg-text branch queries at 2."""
    m = tiny_model
    ids = m.encode_text("Translate to FLAIR.")
    n = len(ids)
    builder = PackBuilder(m.special)
    pos = m.model.latent_position_ids(2, 2)
    builder.add_vae_image(torch.zeros(4, 16), 2, 2, pos)
    builder.add_vit_image(torch.zeros(3, 28, 28), 14)
    text_start = builder.length
    builder.add_text(ids)
    builder.add_vae_image(torch.zeros(4, 16), 2, 2, pos, timestep=0.5)
    p = builder.build().position_ids.tolist()
    assert p[:6] == [0] * 6 and p[6:12] == [1] * 6
    assert p[text_start:text_start + n + 2] == list(range(2, n + 4))
    assert p[-6:] == [n + 4] * 6


def _settings(**kw):
    base = dict(num_inference_steps=4, cfg_text_scale=3.0, cfg_img_scale=1.7, cfg_interval=(0.0, 1.0),
                timestep_shift=3.0, cfg_renorm_type="text_channel", cfg_renorm_min=0.0)
    base.update(kw)
    return GuidanceSettings(**base)


def _edit_contexts(m, image, ids):
    vit_image = image[:, :28, :28]  # the ViT side must be a multiple of 14, the VAE side of 16
    latent = vae_encode(m.vae, image[None], m.config.vae)[0]
    tokens = patchify_latent(latent, 2)
    lh, lw = latent.shape[1] // 2, latent.shape[2] // 2

    def build(with_image, with_text):
        ctx = Context(m.model, m.special, 400)
        if with_image:
            ctx.add_vae_latents(tokens, lh, lw)
            ctx.add_vit_image(vit_image)
        if with_text:
            ctx.add_text(ids)
        return ctx

    return build(True, True), build(True, False), build(False, True)


def test_batched_guidance_equals_three_separate_passes(tiny_model):
    m = tiny_model
    image = _image(32, 32, seed=1)
    ids = m.encode_text("Remove the lesion.")
    cond, image_only, text_only = _edit_contexts(m, image, ids)
    settings = _settings()
    h = w = 2
    noise = torch.randn(h * w, m.config.patch_latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        batched = denoise(cond, [Branch.of(cond), Branch.of(image_only), Branch.of(text_only)], h, w, noise,
                          settings, progress=False)

        # The same integration, one branch at a time on its own cache, as the reference runs it.
        scheduler = make_scheduler(settings.num_inference_steps, settings.timestep_shift)
        x = noise.clone()
        pos = m.model.latent_position_ids(h, w)
        markers = m.model.embed_tokens(torch.tensor([m.special.vision_start, m.special.vision_end]))
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i]
            ts, img_s = guidance_scales(sigma, settings.cfg_interval, settings.cfg_text_scale, settings.cfg_img_scale)
            velocities = []
            for ctx in (cond, image_only, text_only):
                emb = m.model.embed_latent_tokens(x, sigma.reshape(1), pos)
                seq = torch.cat([markers[:1], emb, markers[1:]])
                positions = torch.full((seq.shape[0],), ctx.rope)
                hidden = ctx.run(seq, positions, image_routing(h * w, "cpu"), causal=False, keep=False)
                velocities.append(m.model.velocity(hidden[1:-1]).float())
            v = combine_guidance(*velocities, ts, img_s, settings.cfg_renorm_type, settings.cfg_renorm_min)
            x = scheduler.step(v, t, x).prev_sample
    assert torch.allclose(batched, x, atol=1e-5), (batched - x).abs().max()


def test_denoising_velocity_equals_training_forward(tiny_model):
    """The noisy block seen through the cache gives the velocity the packed training forward gives."""
    m = tiny_model
    image = _image(32, 32, seed=2)
    ids = m.encode_text("Make it brighter.")
    cond, _, _ = _edit_contexts(m, image, ids)
    h = w = 2
    x_t = torch.randn(h * w, m.config.patch_latent_dim, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.6])
    pos = m.model.latent_position_ids(h, w)
    with torch.inference_mode():
        markers = m.model.embed_tokens(torch.tensor([m.special.vision_start, m.special.vision_end]))
        seq = torch.cat([markers[:1], m.model.embed_latent_tokens(x_t, t, pos), markers[1:]])
        hidden = cond.run(seq, torch.full((seq.shape[0],), cond.rope), image_routing(h * w, "cpu"), causal=False,
                          keep=False)
        v_cache = m.model.velocity(hidden[1:-1])

        latent = vae_encode(m.vae, image[None], m.config.vae)[0]
        clean = patchify_latent(latent, 2)
        builder = PackBuilder(m.special)
        builder.add_vae_image(clean, 2, 2, m.model.latent_position_ids(2, 2))
        builder.add_vit_image(image[:, :28, :28], 14)
        builder.add_text(ids)
        builder.add_vae_image(torch.zeros_like(x_t), h, w, pos, timestep=0.6)
        builder.add_text(m.encode_text("Done."), loss=True)  # a later block must not change the noisy tokens
        pack = builder.build()
        inputs = torch.cat([clean, x_t])
        hidden = m.model.forward_pack(pack, vae_inputs=inputs)
        target_positions = pack.vae_index[pack.mse_index]
        v_pack = m.model.velocity(hidden[target_positions])
    assert torch.allclose(v_cache, v_pack, atol=2e-5), (v_cache - v_pack).abs().max()


def test_generation_skips_unneeded_branches(tiny_model):
    m = tiny_model
    assert _settings(cfg_text_scale=1.0).max_branches() == 1
    assert _settings(cfg_img_scale=1.0).max_branches() == 2
    assert _settings().max_branches() == 3
    # t2i with image scale 1: no image-unconditional pass at all, output unchanged by the scale value <= 1
    a = m.generate_image("nodule", height=32, width=32, num_inference_steps=3, cfg_img_scale=1.0,
                         generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
    b = m.generate_image("nodule", height=32, width=32, num_inference_steps=3, cfg_img_scale=0.5,
                         generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
    assert torch.equal(a, b)
