"""The token layout shared by inference contexts and training packs (docs/token-layout.md), the flow-matching
objective (docs/training.md) and one training step on a tiny model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from unimedvl_core.inference.context import Context
from unimedvl_core.modeling.flow_matching import (
    flow_inputs,
    sample_flow_time,
    shift_flow_time,
    token_mean,
    velocity_loss_sum,
)
from unimedvl_core.modeling.layout import TokenLayout, image_block_len, text_block_ids, text_block_len
from unimedvl_core.modeling.packing import PackBuilder
from unimedvl_core.modeling.tokenizer import SpecialTokenIds
from unimedvl_core.modeling.unimedvl import UniMedVLModel
from unimedvl_core.training.config import OptimConfig
from unimedvl_core.training.trainer import TrainState, apply_freezing, train_step

from .conftest import tiny_config

SPECIAL = SpecialTokenIds(im_start=1, im_end=2, vision_start=3, vision_end=4)
PATCH = 14


@pytest.fixture(scope="module")
def net() -> UniMedVLModel:
    model = UniMedVLModel(tiny_config())
    model.init_weights(seed=0, zero_llm2vae=False)
    return model.eval()


def _ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(10, 600, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _image(h: int = 28, w: int = 42) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _recording(context: Context) -> list[int]:
    """Record the position ids of every token the context runs through the LLM."""
    seen: list[int] = []
    run = context.run

    def recorded(embeds, positions, routing, causal, **options):
        seen.extend(positions.tolist())
        return run(embeds, positions, routing, causal, **options)

    context.run = recorded
    return seen


def test_block_sizes_and_ids():
    assert text_block_len(5) == 7 and image_block_len(6) == 8
    assert text_block_ids([7, 8], SPECIAL) == [SPECIAL.im_start, 7, 8, SPECIAL.im_end]


def test_token_layout_positions():
    layout = TokenLayout()
    assert list(layout.text(3)) == [0, 1, 2, 3, 4]
    assert layout.image(2) == [5, 5, 5, 5]
    assert layout.image(2, advance=False) == [6, 6, 6, 6]
    assert list(layout.text(0)) == [6, 7]  # the block after a noisy target reuses its position
    layout.skip()
    assert list(layout.tokens(2)) == [9, 10]
    assert (layout.rope, layout.length) == (11, 5 + 4 + 4 + 2 + 2)
    layout.restart()
    assert (layout.rope, layout.length) == (0, 17)
    assert TokenLayout.planned_length(text=[3, 0], images=[2, 2], extra=2) == 17


def test_vqa_context_and_pack_give_the_same_positions(net):
    """Inference (block by block through the KV cache) and training (one pack) lay a VQA prompt out alike."""
    image, ids = _image(), _ids(9)
    n_vit = (28 // PATCH) * (42 // PATCH)
    capacity = Context.capacity_for(text=[len(ids)], images=[n_vit], decode=1)
    context = Context(net, SPECIAL, capacity)
    seen = _recording(context)
    with torch.inference_mode():
        context.add_vit_image(image)
        context.add_text(ids, extra_ids=[SPECIAL.im_start])
    builder = PackBuilder(SPECIAL)
    builder.add_vit_image(image, PATCH)
    builder.add_text(ids, loss=True)
    builder.add_open_text([SPECIAL.im_start])
    pack = builder.build()
    assert seen == pack.position_ids.tolist()
    assert context.length == capacity == pack.length  # the planned capacity is exactly what was added
    assert context.rope == builder.rope == len(ids) + 4


def test_edit_context_and_pack_give_the_same_positions(net):
    """Condition VAE + ViT + instruction: same positions; the noisy target sits at the context's next position
    and, in training, does not advance it."""
    image, ids = _image(), _ids(6, seed=2)
    h, w = 2, 3
    latents = torch.randn(h * w, net.config.patch_latent_dim, generator=torch.Generator().manual_seed(3))
    pos = net.latent_position_ids(h, w)
    n_vit = (28 // PATCH) * (42 // PATCH)
    capacity = Context.capacity_for(text=[len(ids)], images=[h * w, n_vit])
    context = Context(net, SPECIAL, capacity)
    seen = _recording(context)
    with torch.inference_mode():
        context.add_vae_latents(latents, h, w)
        context.add_vit_image(image)
        context.add_text(ids)
    assert context.length == capacity
    builder = PackBuilder(SPECIAL)
    builder.add_vae_image(latents, h, w, pos)
    builder.add_vit_image(image, PATCH)
    builder.add_text(ids)
    prompt_len = builder.length
    builder.add_vae_image(torch.zeros_like(latents), h, w, pos, timestep=0.5)
    builder.add_text(ids, loss=True)
    positions = builder.build().position_ids.tolist()
    assert seen == positions[:prompt_len]
    noisy = positions[prompt_len:prompt_len + image_block_len(h * w)]
    assert noisy == [context.rope] * image_block_len(h * w)
    after = positions[prompt_len + image_block_len(h * w):]
    assert after == list(range(context.rope, context.rope + text_block_len(len(ids))))


def test_samples_of_a_pack_restart_positions_and_dropped_images_keep_theirs():
    builder = PackBuilder(SPECIAL)
    builder.start_sample()
    builder.add_text([9, 9])
    builder.start_sample()
    builder.skip_image()
    builder.add_text([9])
    assert builder.build().position_ids.tolist() == [0, 1, 2, 3, 1, 2, 3]


def test_flow_time_is_logit_normal_and_shifted():
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    for shift in (1.0, 3.0):
        t = 1.0 / (1.0 + math.exp(-float(ref.standard_normal())))
        assert sample_flow_time(rng, shift) == shift * t / (1.0 + (shift - 1.0) * t)
    assert shift_flow_time(0.5, 1.0) == 0.5 and shift_flow_time(0.5, 3.0) == 0.75


def test_flow_inputs_noise_targets_and_keep_conditions_clean():
    x0 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.0, 0.0, 0.3, 0.7, 1.0])
    x_t, target = flow_inputs(x0, t, torch.tensor([2, 3, 4]), torch.Generator().manual_seed(1))
    eps = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x_t[:2], x0[:2])
    assert torch.allclose(x_t, (1 - t[:, None]) * x0 + t[:, None] * eps)
    assert torch.equal(target, (eps - x0)[2:])
    assert torch.allclose(velocity_loss_sum(target + 1.0, target), torch.tensor(3.0))
    assert token_mean(torch.tensor(6.0), torch.tensor(0.0), 2) == 12.0  # no supervised tokens: no division by 0


def _training_pack(model: UniMedVLModel):
    """A condition image, an instruction, a noisy target and a supervised answer; clean latents x0."""
    h = w = 2
    grid = model.latent_position_ids(h, w)
    builder = PackBuilder(SPECIAL)
    builder.add_vae_image(None, h, w, grid)
    builder.add_text(_ids(5, seed=4))
    builder.add_vae_image(None, h, w, grid, timestep=0.6)
    builder.add_text(_ids(4, seed=5), loss=True)
    x0 = torch.randn(2 * h * w, model.config.patch_latent_dim, generator=torch.Generator().manual_seed(6))
    return builder.build(), x0


def test_train_step_lowers_the_loss_and_moves_the_ema():
    model = UniMedVLModel(tiny_config())
    model.init_weights(seed=0, zero_llm2vae=False)
    optim = OptimConfig(lr=2e-3, warmup_steps=0, ema=0.5)
    apply_freezing(model, optim)
    model.train()
    state = TrainState.create(model, optim, steps=10)
    pack, x0 = _training_pack(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    shadow = copy.deepcopy(state.ema.shadow)
    losses = []
    for _ in range(6):
        metrics = train_step(state, pack, x0, torch.Generator().manual_seed(7))
        assert set(metrics) == {"loss", "ce", "mse", "grad_norm"}
        losses.append(metrics["loss"])
    assert losses[-1] < losses[0]
    assert state.scheduler.get_last_lr()[0] == pytest.approx(2e-3)
    name = "llm2vae.weight"
    param, ema = model.get_parameter(name).detach(), state.ema.shadow[name]
    assert not torch.equal(param, start[name])
    assert torch.equal(shadow[name], start[name])
    assert (ema - param).norm() < (start[name] - param).norm()
