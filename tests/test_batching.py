"""Batched requests (docs/sampling.md#batched-requests): several images per forward equal each image made
alone with the same noise, and the server runs concurrent requests of one task together.

Tolerance: a batched image differs from the single run only in float32 reduction order (larger matrix
products); measured <= 4e-7 on these latents, so 1e-5."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from unimedvl_core.surfaces.server.app import Settings, create_app

from .conftest import random_model

TOL = 1e-5
STEPS = dict(num_inference_steps=3, progress=False)
PROMPTS = ["one nodule", "two large nodules in the left lower lobe of the lung", "axial CT"]


def close(a, b) -> bool:
    return all((x - y).abs().max() < TOL for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("img_scale", [1.0, 2.0])  # 2 and 3 guidance branches per image
def test_batched_generation_equals_single(tiny_model, img_scale):
    latents = torch.randn(3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    kw = dict(STEPS, output_type="latent", cfg_img_scale=img_scale)
    batched = tiny_model.generate_image(PROMPTS, latents=latents, **kw)
    single = [tiny_model.generate_image(p, latents=z, **kw) for p, z in zip(PROMPTS, latents)]
    assert isinstance(batched, list) and close(batched, single)
    steps = []
    bounded = tiny_model.generate_image(PROMPTS, latents=latents, batch_size=2,
                                        callback=lambda s, t: steps.append((s, t)), **kw)
    assert close(bounded, single) and steps[-1] == (6, 6) and len(steps) == 6  # two forwards of 2 and 1 images


def test_generators_follow_the_documented_convention(tiny_model):
    kw = dict(STEPS, height=32, width=32, output_type="latent")
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    listed = tiny_model.generate_image(PROMPTS[:2], generator=gens, **kw)
    alone = [tiny_model.generate_image(p, generator=torch.Generator().manual_seed(s), **kw)
             for p, s in zip(PROMPTS[:2], (5, 6))]
    assert close(listed, alone)
    one = tiny_model.generate_image(PROMPTS[0], num_images_per_prompt=2, generator=torch.Generator().manual_seed(1),
                                    **kw)
    g = torch.Generator().manual_seed(1)
    sequential = [tiny_model.generate_image(PROMPTS[0], generator=g, **kw) for _ in range(2)]
    assert close(one, sequential) and not torch.equal(one[0], one[1])
    with pytest.raises(ValueError, match="generators"):
        tiny_model.generate_image(PROMPTS, generator=gens, **kw)
    with pytest.raises(ValueError, match="latents"):
        tiny_model.generate_image(PROMPTS, latents=torch.zeros(2, 4, 4, 4), **kw)


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random(size) * 255).astype("uint8")) for size in
            [(48, 40, 3), (48, 40, 3), (32, 32, 3)]]


def test_batched_editing_equals_single(tiny_model):
    images, instructions = _images(), ["Make it darker.", "Remove the lesion in the upper left corner.", "x"]
    kw = dict(STEPS, output_type="latent", vae_posterior="sample")
    batched = tiny_model.edit_image(images, instructions, generator=torch.Generator().manual_seed(3), **kw)
    g = torch.Generator().manual_seed(3)  # one generator: posterior sample then noise, input after input
    single = [tiny_model.edit_image(i, t, generator=g, **kw) for i, t in zip(images, instructions)]
    assert [tuple(x.shape) for x in batched] == [tuple(x.shape) for x in single] and close(batched, single)


def test_named_tasks_accept_lists(tiny_model):
    images = _images()[:2]
    noise = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(4))
    kw = dict(STEPS, output_type="latent", latents=noise)
    assert close(tiny_model.virtual_stain(images, **kw),
                 [tiny_model.virtual_stain(i, latents=z, **STEPS, output_type="latent") for i, z in
                  zip(images, kw["latents"])])
    small = [i.resize((16, 16)) for i in images]
    sr = tiny_model.super_resolve(small, scale=2, **STEPS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert [im.size for im in sr] == [(32, 32)] * 2
    cf = tiny_model.counterfactual_edit(images, "Remove the lesion.", max_explanation_tokens=3, **kw)
    alone = tiny_model.counterfactual_edit(images[1], "Remove the lesion.", max_explanation_tokens=3, **STEPS,
                                           output_type="latent", latents=kw["latents"][1])
    assert len(cf) == 2 and (cf[1].image - alone.image).abs().max() < TOL and cf[1].explanation == alone.explanation


@pytest.fixture(scope="module")
def server():
    model = random_model(seed=3)
    model.answer_batch = lambda images, questions, **d: [model.answer(i, q, **d) for i, q in zip(images, questions)]
    app = create_app(model=model, settings=Settings(batch_window=0.5, max_batch=4))
    with TestClient(app) as client:
        yield client, app


def _concurrently(fn, args) -> list:
    out = [None] * len(args)
    threads = [threading.Thread(target=lambda k=k: out.__setitem__(k, fn(args[k]))) for k in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_server_batches_concurrent_generations(server):
    client, app = server
    body = lambda k: {"prompt": PROMPTS[k], "seed": k, "height": 32, "width": 32, "num_inference_steps": 3,
                      "output": "npy"}
    get = lambda k: np.load(io.BytesIO(client.post("/v1/generate", json=body(k)).content)).astype(int)
    together, alone = _together_then_alone(app, get)
    assert together[0].shape == (32, 32, 3)
    assert not np.array_equal(alone[0], alone[1])


def _together_then_alone(app, run) -> tuple[list, list]:
    """Three requests sent at once (fewer than three model calls), then one by one; each request's image is
    its lone run's within one grey level (fp32 reduction order)."""
    before = app.state.worker.model_calls
    together = _concurrently(run, [0, 1, 2])
    calls = app.state.worker.model_calls - before
    alone = [run(k) for k in range(3)]
    assert calls < 3
    for a, b in zip(together, alone):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1
    return together, alone


def test_server_batches_vqa_through_answer_batch(server):
    client, app = server
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (90, 90, 90)).save(png, format="PNG")
    ask = lambda q: client.post("/v1/vqa", files={"image": ("a.png", png.getvalue())},
                                data={"question": q, "max_new_tokens": "3"}).json()["answer"]
    before = app.state.worker.model_calls
    together = _concurrently(ask, ["Is there a lesion?", "How many?"])
    assert app.state.worker.model_calls - before == 1
    assert together == [ask("Is there a lesion?"), ask("How many?")]


def _png(size: tuple[int, int], shade: int) -> bytes:
    out = io.BytesIO()
    pixels = (np.arange(size[0] * size[1] * 3).reshape(size[1], size[0], 3) * shade) % 256
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def small_tile_server():
    """A server whose model makes 64-px images, so a x2 super-resolution of 48 px runs in several tiles."""
    app = create_app(model=random_model(seed=3, max_latent_size=4), settings=Settings(batch_window=0.5, max_batch=4))
    with TestClient(app) as client:
        yield client, app


@pytest.mark.parametrize("task, fields, sizes", [
    ("edit", [{"instruction": "Remove the lesion."}, {"instruction": "Add a nodule."},
              {"instruction": "Remove the lesion."}], [(24, 24), (24, 24), (16, 20)]),
    # tiled (the default): 96-px outputs in 64-px tiles, each request keeping its own tiles' noise
    ("super_resolution", [{"scale": "2"}] * 3, [(48, 48), (48, 48), (40, 44)]),
])
def test_server_batches_concurrent_image_to_image(server, small_tile_server, task, fields, sizes):
    client, app = small_tile_server if task == "super_resolution" else server
    images = [_png(size, shade) for size, shade in zip(sizes, (3, 7, 5))]  # two sizes: grouped by output size

    def run(k):
        data = dict(fields[k], seed=str(k), num_inference_steps="3", output="npy")
        r = client.post(f"/v1/image-to-image/{task}", files={"image": ("a.png", images[k])}, data=data)
        assert r.status_code == 200, r.text
        return np.load(io.BytesIO(r.content)).astype(int)

    together, _ = _together_then_alone(app, run)
    assert together[0].shape != together[2].shape


def test_a_cancelled_job_leaves_its_batch_running(server):
    client, _ = server
    body = {"prompt": "CT", "height": 32, "width": 32, "num_inference_steps": 40, "output": "npy"}
    ids = _concurrently(lambda k: client.post("/v1/jobs/generate", json=dict(body, seed=k)).json()["id"], [0, 1])
    client.delete(f"/v1/jobs/{ids[0]}")
    for _ in range(600):
        states = [client.get(f"/v1/jobs/{i}").json() for i in ids]
        if states[1]["status"] == "done":
            break
        threading.Event().wait(0.05)
    assert states[0]["status"] == "cancelled" and states[1]["status"] == "done" and states[1]["step"] == 40
    assert client.get(f"/v1/jobs/{ids[1]}/result").status_code == 200
