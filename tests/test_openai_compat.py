"""The OpenAI-compatible routes, driven by the official ``openai`` client against a loopback uvicorn server:
models, chat completions (multi-turn, images, streaming), image generations and edits, auth and limits."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import openai
import pytest
import torch
import uvicorn
from PIL import Image

from unimedvl_core.io.provenance import DEMO_NOTICE
from unimedvl_core.surfaces.client import ServerError, UniMedVLClient, data_url
from unimedvl_core.surfaces.server.app import Settings, create_app
from unimedvl_core.tasks.catalog import MAX_NEW_TOKENS

from .conftest import random_model

TOKEN = "0penai-t0ken"


class LoopbackServer:
    """uvicorn on 127.0.0.1 at a free port, in a thread, for the life of a ``with`` block."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def model():
    m = random_model(seed=5)
    m.progress = False
    return m


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("local-images")
    Image.new("RGB", (40, 40), (120, 60, 60)).save(root / "slice.png")
    settings = Settings(token=TOKEN, max_image_pixels=1_000_000, local_image_root=root, max_images_per_request=3)
    with LoopbackServer(create_app(model=model, settings=settings)) as url:
        yield url, root


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=TOKEN, max_retries=0, timeout=300)


def png(size=(48, 40), value=90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value // 2, value)).save(buf, format="PNG")
    return buf.getvalue()


def png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_models_lists_the_served_id_and_other_ids_are_404(client, model):
    ids = [m.id for m in client.models.list()]
    assert ids == [model.name]
    assert client.models.retrieve(model.name).id == model.name
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert f"serves {model.name!r}" in err.value.message and err.value.body["code"] == "model_not_found"


def conversation(image: bytes) -> list[dict]:
    return [{"role": "system", "content": "You are a radiology assistant."},
            {"role": "user", "content": [{"type": "text", "text": "Is there a lesion?"},
                                         {"type": "image_url", "image_url": {"url": png_url(image)}}]},
            {"role": "assistant", "content": "Yes, one."},
            {"role": "user", "content": "Where is it?"}]


def test_chat_is_the_models_multi_turn_answer(client, model):
    image = png()
    reply = client.chat.completions.create(model=model.name, messages=conversation(image), max_tokens=6)
    expected = model.chat([{"role": "system", "content": "You are a radiology assistant."},
                           {"role": "user", "content": "Is there a lesion?", "images": [Image.open(io.BytesIO(image))]},
                           {"role": "assistant", "content": "Yes, one."},
                           {"role": "user", "content": "Where is it?"}], max_new_tokens=6, return_dict=True)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == ("stop" if expected.stopped_by == "stop_token" else "length")
    assert reply.usage.completion_tokens == len(expected.token_ids) and reply.usage.prompt_tokens > 0
    assert reply.model == model.name and reply.model_extra["notice"] is None
    assert model.name in reply.model_extra["weights"]
    # the earlier turns matter: without them the answer is the single-turn one
    alone = client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": "Where is it?"}],
                                           max_tokens=6)
    assert alone.choices[0].message.content == model.chat([{"role": "user", "content": "Where is it?"}],
                                                          max_new_tokens=6)


def test_prompt_tokens_count_what_the_model_prefilled(client, model):
    """Text: its ids between <|im_start|> and <|im_end|>, plus the answer's start token; a 40x40 image is read
    at 378x378 (the short edge raised to 378, docs/preprocessing.md), 27x27 patches of 14 px, between two
    vision markers: 731 tokens more."""
    question = "Is there a lesion?"
    text_only = client.chat.completions.create(model=model.name, max_tokens=2,
                                               messages=[{"role": "user", "content": question}])
    assert text_only.usage.prompt_tokens == len(model.encode_text(question)) + 2 + 1
    with_image = client.chat.completions.create(model=model.name, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url(png((40, 40)))}}, {"type": "text", "text": question}]}])
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 27 * 27 + 2
    assert with_image.usage.total_tokens == with_image.usage.prompt_tokens + with_image.usage.completion_tokens


def test_streamed_chunks_add_up_to_the_answer(client, model):
    messages = conversation(png())
    full = client.chat.completions.create(model=model.name, messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model=model.name, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices


def test_sampling_follows_temperature_and_seed(client, model):
    messages = [{"role": "user", "content": "Describe."}]
    a, b = (client.chat.completions.create(model=model.name, messages=messages, max_tokens=8, temperature=1.5,
                                           seed=7).choices[0].message.content for _ in range(2))
    assert a == b  # the same seed draws the same answer
    greedy = model.chat(messages, max_new_tokens=8)
    assert client.chat.completions.create(model=model.name, messages=messages, max_tokens=8,
                                          temperature=0).choices[0].message.content == greedy
    sampled = {client.chat.completions.create(model=model.name, messages=messages, max_tokens=8, temperature=5.0,
                                              seed=s).choices[0].message.content for s in range(4)}
    assert len(sampled) > 1


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": MAX_NEW_TOKENS + 1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 11}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"),
    ({"extra_body": {"logprobs": True}}, "logprobs"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 64
      + [{"role": "user", "content": "z"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]},
     "messages.0.content.0.image_url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                           "!!"}}]}]},
     "messages.0.content.0.image_url"),
])
def test_bad_chat_requests_are_400_naming_the_field(client, model, kwargs, param):
    kwargs = {"messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model.name, **kwargs)
    assert err.value.body["param"] == param, err.value.body
    assert err.value.status_code == 400


def test_local_image_paths_only_under_the_allowed_folder(client, model, served):
    _, root = served
    by_path = client.chat.completions.create(model=model.name, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "slice.png"}},
                                     {"type": "text", "text": "Describe."}]}])
    by_data = client.chat.completions.create(model=model.name, max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(
            (root / "slice.png").read_bytes())}}, {"type": "text", "text": "Describe."}]}])
    assert by_path.choices[0].message.content == by_data.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(root.parent / "x.png")}},
            {"type": "text", "text": "x"}]}])


def test_auth_and_limits(served, client, model):
    wrong = openai.OpenAI(base_url=served[0] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="CT", extra_body={"num_inference_steps": 1})
    big = png((1200, 1000))  # over the server's 1,000,000 pixels
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": png_url(big)}}, {"type": "text", "text": "x"}]}])
    assert err.value.status_code == 413
    many = [{"type": "image_url", "image_url": {"url": png_url(png())}}] * 4 + [{"type": "text", "text": "x"}]
    with pytest.raises(openai.BadRequestError, match="4 images exceed 3"):
        client.chat.completions.create(model=model.name, messages=[{"role": "user", "content": many}])


def test_image_generations_are_labelled_and_seeded(client, model, served):
    steps = {"num_inference_steps": 2, "seed": 11}
    out = client.images.generate(prompt="CT with one lesion", n=2, size="48x32", model=model.name,
                                 extra_body=steps)
    images = [decoded(d.b64_json) for d in out.data]
    assert [im.size for im in images] == [(48, 32)] * 2 and images[0].text["SyntheticData"] == "YES"
    assert out.model_extra["synthetic"] is True and out.model_extra["task"] == "text_to_image"
    # image k is seed+k: the same pixels as the native route with that seed
    native = UniMedVLClient(served[0], token=TOKEN).generate("CT with one lesion", height=32, width=48,
                                                             num_inference_steps=2, seed=12)
    assert np.array_equal(np.asarray(images[1].convert("RGB")), native)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


@pytest.mark.parametrize("kwargs,param", [
    ({"size": "33x32"}, "size"), ({"size": "4096x4096"}, "size"), ({"response_format": "url"}, "response_format"),
    ({"n": 4}, "n"), ({"extra_body": {"num_inference_steps": 999}}, None), ({"model": "dall-e-3"}, "model"),
    ({"extra_body": {"height": 32}}, "height"),
])
def test_bad_generation_requests_are_4xx(client, kwargs, param):
    with pytest.raises(openai.APIStatusError) as err:
        client.images.generate(prompt="CT", **kwargs)
    assert err.value.status_code in (400, 404)
    assert err.value.body["param"] == param or param is None and "num_inference_steps" in err.value.message


def test_image_edits_run_registry_tasks(client, model):
    source = png((32, 32))
    out = client.images.edit(image=("a.png", source, "image/png"), prompt="Remove the lesion.",
                             extra_body={"num_inference_steps": 1})
    assert out.model_extra["task"] == "edit" and decoded(out.data[0].b64_json).size == (32, 32)
    out = client.images.edit(image=("a.png", source, "image/png"), prompt="Remove the lesion.", n=2,
                             extra_body={"task": "counterfactual", "num_inference_steps": 1})
    assert len(out.data) == 2 and isinstance(out.model_extra["explanation"], str)
    out = client.images.edit(image=("a.png", png((16, 16)), "image/png"), prompt="",
                             extra_body={"task": "super-resolution", "scale": 2, "num_inference_steps": 1})
    assert out.model_extra["task"] == "super_resolution" and decoded(out.data[0].b64_json).size == (32, 32)
    assert decoded(out.data[0].b64_json).text["SyntheticData"] == "YES"
    for extra, param in (({"task": "teleport"}, "task"), ({"warp": 1}, None), ({"task": "super_resolution",
                                                                                "size": "64x64"}, "size")):
        with pytest.raises(openai.BadRequestError) as err:
            client.images.edit(image=("a.png", source, "image/png"), prompt="x",
                               extra_body={"num_inference_steps": 1, **extra})
        assert err.value.body["param"] == param or "warp" in err.value.message
    with pytest.raises(openai.BadRequestError, match="mask"):
        client.images.edit(image=("a.png", source, "image/png"), mask=("m.png", source, "image/png"), prompt="x")


def test_image_edits_take_several_images_each_edited_n_times(client):
    """The openai client sends a list as ``image[]`` parts; each image gets ``n`` results, image after image,
    each equal to a request with that image alone (same seeds)."""
    first, second = png((32, 32), 90), png((16, 16), 200)
    steps = {"num_inference_steps": 1, "seed": 11}
    out = client.images.edit(image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                             prompt="Remove the lesion.", n=1, extra_body=steps)
    assert [decoded(d.b64_json).size for d in out.data] == [(32, 32), (16, 16)]
    alone = [client.images.edit(image=(name, data, "image/png"), prompt="Remove the lesion.", extra_body=steps)
             for name, data in (("a.png", first), ("b.png", second))]
    for together, single in zip(out.data, alone):
        np.testing.assert_array_equal(np.asarray(decoded(together.b64_json)),
                                      np.asarray(decoded(single.data[0].b64_json)))
    out = client.images.edit(image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
                             prompt="", n=1, extra_body={"task": "super_resolution", "scale": 2, **steps})
    assert [decoded(d.b64_json).size for d in out.data] == [(64, 64), (32, 32)]
    with pytest.raises(openai.BadRequestError, match="4 images") as err:  # 2 per image, 2 images: over 3
        client.images.edit(image=[("a.png", first, "image/png"), ("b.png", second, "image/png")], prompt="x", n=2,
                           extra_body=steps)
    assert err.value.body["param"] == "n"


def test_the_slicer_client_chats(served, model):
    client = UniMedVLClient(served[0], token=TOKEN)
    array = np.asarray(Image.open(io.BytesIO(png())))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(array)}},
                                             {"type": "text", "text": "Is there a lesion?"}]},
                {"role": "assistant", "content": "No."}, {"role": "user", "content": "Are you sure?"}]
    answer = client.chat(messages, max_tokens=6)
    expected = model.chat([{"role": "user", "content": "Is there a lesion?", "images": [array]},
                           {"role": "assistant", "content": "No."}, {"role": "user", "content": "Are you sure?"}],
                          max_new_tokens=6)
    assert answer == expected and client.last_notice is None
    assert "".join(client.chat(messages, max_tokens=6, stream=True)) == answer
    with pytest.raises(ServerError, match="max_tokens"):
        client.chat(messages, max_tokens=0)


def test_demo_model_answers_carry_the_notice_once(model):
    demo = random_model(seed=5)
    demo.provenance.demo = True
    with LoopbackServer(create_app(model=demo)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["unimedvl-embedded-demo"]
        reply = client.chat.completions.create(model="unimedvl-embedded-demo", max_tokens=3,
                                               messages=[{"role": "user", "content": "Any effusion?"}])
        assert reply.model_extra["notice"] == DEMO_NOTICE
        chunks = list(client.chat.completions.create(model="unimedvl-embedded-demo", max_tokens=3, stream=True,
                                                     messages=[{"role": "user", "content": "Any effusion?"}]))
        assert [c.model_extra.get("notice") for c in chunks].count(DEMO_NOTICE) == 1
        out = client.images.generate(prompt="CT", size="32x32", extra_body={"num_inference_steps": 1})
        assert out.model_extra["notice"] == DEMO_NOTICE
        native = UniMedVLClient(url)
        assert native.vqa(np.zeros((32, 32), np.uint8), "x", max_new_tokens=2) is not None
    assert torch.equal(demo.model.embed_tokens.weight, model.model.embed_tokens.weight)
