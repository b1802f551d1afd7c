"""What the OpenAI-compatible layer costs over the native routes, on a loopback server with the embedded model.

    python benchmarks/bench_server.py [--repeats 5] [--tokens 32] [--steps 4]

Times, as the median of ``--repeats`` requests each: ``POST /v1/vqa`` against ``POST /v1/chat/completions``
with the same image and question (an image as a data URL against a multipart upload), the first streamed
token of a streamed chat answer, and ``n=2`` images from ``/v1/images/generations`` (run together) against two
``/v1/generate`` requests one after the other. Uses the official ``openai`` client and the standard-library
``UniMedVLClient``.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import threading
import time

import numpy as np
import openai
import uvicorn
from PIL import Image

from unimedvl_core.data.phantoms import render, sample_phantom
from unimedvl_core.inference.embedded import load_default_model
from unimedvl_core.surfaces.client import UniMedVLClient
from unimedvl_core.surfaces.server.app import create_app


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def start(app) -> tuple[uvicorn.Server, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


def first_token(client, model: str, messages: list, tokens: int) -> None:
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    model = load_default_model(progress=False)
    server, url = start(create_app(model=model))
    native, client = UniMedVLClient(url), openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    image = render(sample_phantom(np.random.default_rng(0), "radiology"), "ct")
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    question = "Is there a lesion?"
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue())
                                            .decode()}}, {"type": "text", "text": question}]}]
    served = client.models.list().data[0].id
    rows = {
        "native /v1/vqa": lambda: native.vqa(image, question, max_new_tokens=args.tokens),
        "openai chat.completions": lambda: client.chat.completions.create(model=served, messages=messages,
                                                                          max_tokens=args.tokens),
        "openai chat, first token": lambda: first_token(client, served, messages, args.tokens),
        "native /v1/generate x2": lambda: [native.generate("CT", height=64, width=64, seed=s,
                                                           num_inference_steps=args.steps) for s in (0, 1)],
        "openai images.generate n=2": lambda: client.images.generate(prompt="CT", n=2, size="64x64", extra_body={
            "num_inference_steps": args.steps}),
    }
    same = native.vqa(image, question, max_new_tokens=args.tokens) == client.chat.completions.create(
        model=served, messages=messages, max_tokens=args.tokens).choices[0].message.content
    print(f"the same answer on both routes: {same}")
    for name, fn in rows.items():
        fn()  # warm-up
        print(f"{name:28s} {median_seconds(fn, args.repeats) * 1000:8.1f} ms")
    server.should_exit = True


if __name__ == "__main__":
    main()
