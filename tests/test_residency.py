"""Task-aware residency: which weights are on the device in each phase, and outputs equal to full residency.

On the CPU the target device is the CPU itself, so a "resident" weight is the real tensor and an absent
one a meta tensor: any use of an absent weight fails, which is what proves a phase never touches it. The
copies and CUDA streams themselves run only in the CUDA test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from unimedvl_core.inference.embedded import load_default_model
from unimedvl_core.inference.residency import (
    GENERATION,
    UNDERSTANDING,
    is_generation_expert,
    is_understanding_only,
)

QUESTION = "How many lesions are there?"
PROMPT = "Axial CT of the abdomen with two lesions."


@pytest.fixture(scope="module")
def full():
    return load_default_model(progress=False)


@pytest.fixture(scope="module")
def task():
    return load_default_model(progress=False, residency="task")


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype("uint8"))


def _generate(model, steps: int = 3):
    return model.generate_image(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(5),
                                output_type="latent", progress=False)


def _names(model, keep) -> set[str]:
    return {n for n in model.residency.host if keep(n)}


def test_nothing_task_dependent_is_resident_before_the_first_task():
    model = load_default_model(progress=False, residency="task")
    assert model.residency.phase is None and model.residency.resident() == set()
    moved = set(model.residency.host)
    assert moved == {n for n, _ in model.model.named_parameters() if is_generation_expert(n) or
                     is_understanding_only(n)}
    assert any(n.startswith("language_model.lm_head.") for n in moved)


def test_understanding_holds_only_the_understanding_expert_and_matches_full_residency(full, task, image):
    want = full.answer(image, QUESTION, max_new_tokens=6, output_logits=True)
    got = task.answer(image, QUESTION, max_new_tokens=6, output_logits=True)
    assert task.residency.phase == UNDERSTANDING
    assert task.residency.resident() == _names(task, is_understanding_only)
    assert all(p.is_meta for n, p in task.model.named_parameters() if is_generation_expert(n))
    assert got.token_ids == want.token_ids
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))  # bit for bit


def test_generation_streams_the_understanding_expert_two_layers_at_most(full, task):
    seen: list[tuple[int, set[str]]] = []
    layers = task.model.language_model.model.layers
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: seen.append((i, task.residency.resident())))
             for i, layer in enumerate(layers)]
    try:
        got = _generate(task)
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(got, _generate(full))  # bit for bit
    assert task.residency.phase == GENERATION
    gen = _names(task, is_generation_expert)
    denoising = [(i, names) for i, names in seen if gen <= names]
    assert denoising, "the generation expert was never resident during a forward"
    for i, names in denoising:
        und_layers = {int(n.split(".")[3]) for n in names - gen}
        assert not any(n.startswith("language_model.lm_head.") for n in names)
        assert und_layers <= {i, (i + 1) % len(layers)}  # this layer (and the next one's prefetch)
    assert task.residency.streamed >= len(layers)


def test_switching_back_and_forth_keeps_outputs_identical(full, task, image):
    want = full.answer(image, QUESTION, max_new_tokens=4, output_logits=True)
    _generate(task, steps=2)
    switches = task.residency.switches
    got = task.answer(image, QUESTION, max_new_tokens=4, output_logits=True)
    assert task.residency.switches == switches + 1 and task.residency.phase == UNDERSTANDING
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    edit_args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(2), output_type="latent",
                     progress=False)
    want_edit = full.edit_image(image, "Translate this T2 MRI image into FLAIR.", **edit_args)
    edit_args["generator"] = torch.Generator().manual_seed(2)
    assert torch.equal(task.edit_image(image, "Translate this T2 MRI image into FLAIR.", **edit_args), want_edit)


def test_an_absent_weight_fails_loudly_instead_of_computing(task):
    task.residency.enter(UNDERSTANDING)
    gen_proj = task.model.language_model.model.layers[0].self_attn.q_proj_moe_gen
    with pytest.raises((RuntimeError, NotImplementedError)):
        gen_proj(torch.zeros(1, gen_proj.in_features))


def test_remove_restores_full_residency(image):
    model = load_default_model(progress=False, residency="task")
    full = load_default_model(progress=False)
    model.residency.enter(GENERATION)
    model.residency.remove()
    assert not any(p.is_meta for p in model.model.parameters())
    assert torch.equal(_generate(model, 2), _generate(full, 2))


def test_residency_and_device_map_are_refused_together():
    with pytest.raises(ValueError, match="device_map cannot be combined"):
        _load_with_map()
    with pytest.raises(ValueError, match="unknown residency"):
        load_default_model(progress=False, residency="gpu")


def _load_with_map():
    from unimedvl_core import UniMedVL
    from unimedvl_core.inference.embedded import DEFAULT_MODEL_DIR

    return UniMedVL.from_pretrained(DEFAULT_MODEL_DIR, device="cpu", device_map={"": "cpu"}, residency="task",
                                    progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_task_residency_is_bit_identical_and_frees_the_idle_expert(image):
    full = load_default_model("cuda", torch.bfloat16, progress=False)
    task = load_default_model("cuda", torch.bfloat16, progress=False, residency="task")
    want = full.answer(image, QUESTION, max_new_tokens=6, output_logits=True)
    got = task.answer(image, QUESTION, max_new_tokens=6, output_logits=True)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))
    on_cuda = {n for n, p in task.model.named_parameters() if p.device.type == "cuda"}
    assert not on_cuda & _names(task, is_generation_expert)
    assert torch.equal(_generate(task), _generate(full))
    assert task.residency.phase == GENERATION
    on_cuda = {n for n, p in task.model.named_parameters() if p.device.type == "cuda"}
    assert not on_cuda & _names(task, is_understanding_only)  # streamed layers are dropped after use
    assert all(h.is_pinned() for n, h in task.residency.host.items() if type(h) is torch.Tensor)
