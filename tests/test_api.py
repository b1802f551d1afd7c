"""The task API: arguments, validation, determinism, decoding options, labelling, named tasks."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from unimedvl_core import UniMedVL
from unimedvl_core.io.synthetic import is_labelled_synthetic

from .conftest import PARITY

IMAGE = PARITY / "image448.png"


def small_gen(model, **kw):
    args = dict(height=32, width=48, num_inference_steps=3, progress=False)
    args.update(kw)
    return model.generate_image("axial CT with two nodules", **args)


def test_generate_image_is_labelled_and_sized(tiny_model):
    image = small_gen(tiny_model, generator=torch.Generator().manual_seed(0))
    assert isinstance(image, Image.Image) and image.size == (48, 32) and image.mode == "RGB"
    assert is_labelled_synthetic(image) and image.info["UniMedVLTask"] == "text-to-image"


def test_generator_and_latents_make_generation_reproducible(tiny_model):
    a = small_gen(tiny_model, generator=torch.Generator().manual_seed(1), output_type="latent")
    b = small_gen(tiny_model, generator=torch.Generator().manual_seed(1), output_type="latent")
    c = small_gen(tiny_model, generator=torch.Generator().manual_seed(2), output_type="latent")
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn((4, 4, 6), generator=torch.Generator().manual_seed(1))
    d = small_gen(tiny_model, latents=noise, output_type="latent")
    assert torch.equal(a, d)  # the generator draws exactly the documented latents shape
    e = tiny_model.generate_image("axial CT with two nodules", latents=noise, num_inference_steps=3,
                                  output_type="latent", progress=False)
    assert torch.equal(d, e)  # size taken from latents


def test_output_types(tiny_model):
    g = lambda: torch.Generator().manual_seed(0)
    np_img = small_gen(tiny_model, generator=g(), output_type="np")
    pt_img = small_gen(tiny_model, generator=g(), output_type="pt")
    pil = small_gen(tiny_model, generator=g())
    assert np_img.shape == (32, 48, 3) and np_img.dtype == np.uint8
    assert torch.equal(pt_img, torch.from_numpy(np_img).permute(2, 0, 1))
    assert np.array_equal(np.asarray(pil), np_img)


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=30), "height must be a multiple of 16"),
    (dict(width=2048), "width must be a multiple of 16 between 16 and 1024"),
    (dict(cfg_renorm_type="norm"), "cfg_renorm_type"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=torch.zeros(4, 3, 3)), "latents must have shape"),
])
def test_generation_arguments_are_validated(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_gen(tiny_model, **kwargs)


def test_empty_prompt_and_question_are_refused(tiny_model):
    with pytest.raises(ValueError, match="prompt"):
        tiny_model.generate_image("  ")
    with pytest.raises(ValueError, match="question"):
        tiny_model.answer(IMAGE, "")


def test_answer_accepts_every_image_form(tiny_model):
    pil = Image.open(IMAGE)
    expected = tiny_model.answer(pil, "What is shown?", max_new_tokens=4)
    assert tiny_model.answer(IMAGE, "What is shown?", max_new_tokens=4) == expected
    assert tiny_model.answer(str(IMAGE), "What is shown?", max_new_tokens=4) == expected
    assert tiny_model.answer(np.asarray(pil), "What is shown?", max_new_tokens=4) == expected
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert tiny_model.answer(ds, "What is shown?", max_new_tokens=4) == \
        tiny_model.answer(get_testdata_file("CT_small.dcm"), "What is shown?", max_new_tokens=4)


def test_streaming_pieces_add_up_to_the_answer(tiny_model):
    pieces = []
    out = tiny_model.answer(IMAGE, "Describe the image.", max_new_tokens=12, streamer=pieces.append,
                            return_dict=True)
    assert "".join(pieces) == out.text and len(pieces) >= 2


def test_stop_tokens_end_decoding_before_them(tiny_model):
    full = tiny_model.answer(IMAGE, "Describe the image.", max_new_tokens=10, return_dict=True, stop_token_ids=[-1])
    stop = full.token_ids[3]
    cut = tiny_model.answer(IMAGE, "Describe the image.", max_new_tokens=10, return_dict=True, stop_token_ids=[stop])
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop)]
    assert cut.stopped_by == "stop_token" and full.stopped_by == "length"


def test_sampling_uses_the_generator_and_top_p(tiny_model):
    run = lambda seed, **kw: tiny_model.answer(IMAGE, "Describe.", max_new_tokens=8, do_sample=True,
                                               temperature=1.5, generator=torch.Generator().manual_seed(seed),
                                               return_dict=True, stop_token_ids=[-1], **kw).token_ids
    assert run(0) == run(0)
    assert run(0) != run(1) or run(0) != run(2)
    greedy = tiny_model.answer(IMAGE, "Describe.", max_new_tokens=8, return_dict=True, stop_token_ids=[-1]).token_ids
    assert run(5, top_p=1e-6) == greedy  # a vanishing nucleus keeps only the most likely token
    with pytest.raises(ValueError, match="top_p"):
        run(0, top_p=0.0)


def test_edit_defaults_to_the_input_size(tiny_model):
    """Generated at the size the VAE rule gives (304x192) and resized back to the input's (docs/tiling.md)."""
    image = Image.new("RGB", (300, 200), (90, 60, 30))
    out = tiny_model.edit_image(image, "Make it darker.", num_inference_steps=2, progress=False)
    assert out.size == (300, 200) and is_labelled_synthetic(out)
    latent = tiny_model.edit_image(image, "Make it darker.", num_inference_steps=2, progress=False,
                                   output_type="latent")
    assert tuple(latent.shape[-2:]) == (192 // 8, 304 // 8)  # latents stay at the generated size
    assert out.info["UniMedVLTask"] == "image-to-image"


def test_edit_posterior_mean_is_deterministic_and_sampling_is_an_option(tiny_model):
    image = Image.open(IMAGE).resize((64, 64))
    run = lambda posterior, seed: tiny_model.edit_image(
        image, "Brighter.", num_inference_steps=2, vae_posterior=posterior, output_type="latent", progress=False,
        latents=torch.zeros(4, 8, 8), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run("mean", 0), run("mean", 1))
    assert not torch.equal(run("sample", 0), run("sample", 1))
    with pytest.raises(ValueError, match="vae_posterior"):
        run("mode", 0)


def test_named_tasks(tiny_model):
    small = Image.open(IMAGE).resize((40, 24))
    sr = tiny_model.super_resolve(small, scale=4, num_inference_steps=2, progress=False)
    assert sr.size == (160, 96) and sr.info["UniMedVLTask"] == "super-resolution"
    with pytest.raises(ValueError, match="exceeds the largest output side"):
        tiny_model.super_resolve(Image.new("RGB", (1100, 300)), scale=4)  # 4400 px > 4096 (docs/tiling.md)
    stained = tiny_model.virtual_stain(small, num_inference_steps=2, progress=False)
    assert "IHC" in stained.info["Description"] and stained.info["UniMedVLTask"] == "virtual-staining"
    flair = tiny_model.translate_contrast(small, "T2", "FLAIR", num_inference_steps=2, progress=False)
    assert "FLAIR" in flair.info["Description"]
    result = tiny_model.counterfactual_edit(small, "Remove the pleural effusion.", num_inference_steps=2,
                                            max_explanation_tokens=5, progress=False)
    assert is_labelled_synthetic(result.image) and isinstance(result.explanation, str)
    with pytest.raises(TypeError, match="unexpected (keyword )?argument"):
        tiny_model.virtual_stain(small, steps=3)


def test_counterfactual_explanation_does_not_see_the_generated_image(tiny_model):
    """As in training, nothing attends to the noisy target, so the explanation depends only on the input
    and the instruction, not on the sampled image."""
    small = Image.open(IMAGE).resize((32, 32))
    a = tiny_model.counterfactual_edit(small, "Remove the nodule.", num_inference_steps=2, progress=False,
                                       latents=torch.zeros(4, 4, 4), max_explanation_tokens=6)
    b = tiny_model.counterfactual_edit(small, "Remove the nodule.", num_inference_steps=2, progress=False,
                                       latents=torch.ones(4, 4, 4), max_explanation_tokens=6)
    assert a.explanation == b.explanation
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_report_prompt_names_the_dicom_modality(tiny_model, monkeypatch):
    seen = {}
    original = UniMedVL.answer

    def spy(self, image, question, **kw):
        seen["question"] = question
        return original(self, image, question, **kw)

    monkeypatch.setattr(UniMedVL, "answer", spy)
    tiny_model.generate_report(get_testdata_file("MR_small.dcm"), max_new_tokens=2)
    assert "MR image" in seen["question"]
