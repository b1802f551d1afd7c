"""GPU figures at the released 14.6B geometry (random bf16 weights), through the public API.

    python benchmarks/bench_gpu.py [--skip-save-load] [--batch 16]

Prints a JSON line after each phase (the last one holds everything): build seconds; VQA prefill ms
(448x448 image + question, up to the first token); decode tokens/s at batch 1 and at ``--batch`` (all rows
together) with the fraction of the memory roofline (weight bytes one decoding step reads / the measured
device-to-device copy bandwidth); VQA answers/s at ``--batch`` against one by one; text-to-image 512x512
and 1024x1024 and editing 512x512 at 49 steps (the published schedule); peak GPU memory; save and load
seconds. Needs one CUDA GPU and no dataset: the tokenizer is the embedded model's (its ids fit the released
vocabulary), the weights are random.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PARITY_IMAGE = REPO / "tests" / "fixtures" / "parity" / "image448.png"
TOKENIZER_DIR = REPO / "unimedvl_core" / "default_model"
QUESTION = "Is there a lesion in the left lung? Describe its size, position and margins."


def build_random_model(preset: str = "released_14b", device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A model preset (the released geometry by default) with random weights, built directly on the device
    (seconds, not minutes)."""
    from accelerate.utils import set_module_tensor_to_device

    from unimedvl_core import UniMedVL
    from unimedvl_core.io.checkpoint import build_empty_model
    from unimedvl_core.modeling.config import UniMedVLConfig
    from unimedvl_core.modeling.tokenizer import load_tokenizer
    from unimedvl_core.modeling.vae import build_vae

    config = UniMedVLConfig.from_preset(REPO / "configs" / "models" / f"{preset}.json")
    model = build_empty_model(config)  # parameters on the meta device, buffers (rotary frequencies) real
    generator = torch.Generator(device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if param.ndim == 1:  # norms 1, biases 0: keeps activations in range over 28 layers
            value.fill_(1.0 if "norm" in name else 0.0)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
    for name, buffer in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device, value=buffer)
    model.eval().requires_grad_(False)
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"parameters built as {wrong}, not {dtype}")
    vae = build_vae(config.vae).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return UniMedVL(model, vae, load_tokenizer(TOKENIZER_DIR), config, tokenizer_dir=TOKENIZER_DIR,
                    name="released geometry, random weights")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def seconds(fn, warmup: bool = True) -> float:
    if warmup:
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def copy_bandwidth(device: str, gigabytes: float = 4.0) -> float:
    """Bytes per second of a large device-to-device copy (a read and a write per byte)."""
    src = torch.empty(int(gigabytes * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    taken = min(seconds(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() / taken


def decode_step_bytes(model) -> int:
    """Weights one decoding step reads: the understanding expert of every layer, the final norm, the head."""
    total = 0
    for name, p in model.model.language_model.named_parameters():
        if "_moe_gen" in name or "embed_tokens" in name:
            continue
        total += p.numel() * p.element_size()
    return total


def decode_figures(model, image, batch: int, tokens: int) -> dict:
    never_stop = dict(stop_token_ids=[-1])
    prefill = seconds(lambda: model.answer(image, QUESTION, max_new_tokens=1, **never_stop))
    full = seconds(lambda: model.answer(image, QUESTION, max_new_tokens=tokens + 1, **never_stop))
    out = {"vqa_prefill_ms": round(prefill * 1e3, 1), "decode_tokens_per_s_b1": round(tokens / (full - prefill), 1)}
    if hasattr(model, "answer_batch"):
        images, questions = [image] * batch, [f"{QUESTION} ({i})" for i in range(batch)]
        b_prefill = seconds(lambda: model.answer_batch(images, questions, max_new_tokens=1, **never_stop))
        b_full = seconds(lambda: model.answer_batch(images, questions, max_new_tokens=tokens + 1, **never_stop))
        out[f"decode_tokens_per_s_b{batch}"] = round(batch * tokens / (b_full - b_prefill), 1)
        one_by_one = full * batch
        out[f"vqa_throughput_b{batch}_vs_b1"] = round(one_by_one / b_full, 2)
    return out


def generation_figures(model, image) -> dict:
    def t2i(side):
        return lambda: model.generate_image("Axial CT of the chest with two nodules.", height=side, width=side,
                                            num_inference_steps=49, generator=torch.Generator().manual_seed(0),
                                            progress=False)

    model.generate_image("warm-up", height=256, width=256, num_inference_steps=2, progress=False)
    edit = lambda: model.edit_image(image.resize((512, 512)), "Translate this T2 image to FLAIR contrast.",
                                    num_inference_steps=49, generator=torch.Generator().manual_seed(0),
                                    progress=False)
    return {"t2i_512_49steps_s": round(seconds(t2i(512), warmup=False), 2),
            "t2i_1024_49steps_s": round(seconds(t2i(1024), warmup=False), 2),
            "edit_512_49steps_s": round(seconds(edit), 2)}


def save_load_figures(model) -> dict:
    from unimedvl_core import UniMedVL

    folder = Path(tempfile.mkdtemp(prefix="unimedvl-bench-"))
    try:
        t0 = time.perf_counter()
        model.save_pretrained(folder / "ckpt")
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = UniMedVL.from_pretrained(folder / "ckpt", device=model.device, dtype=model.dtype, progress=False)
        sync()
        load = time.perf_counter() - t0
        del loaded
        return {"save_s": round(saved, 1), "load_s": round(load, 1)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def roofline(model, row: dict, device: str) -> dict:
    bandwidth = copy_bandwidth(device, 4.0 if device.startswith("cuda") else 0.25)
    limit = bandwidth / decode_step_bytes(model)
    return {"copy_bandwidth_TBps": round(bandwidth / 1e12, 2), "decode_roofline_tokens_per_s": round(limit, 1),
            "decode_roofline_fraction_b1": round(row["decode_tokens_per_s_b1"] / limit, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per measurement")
    parser.add_argument("--skip-save-load", action="store_true")
    parser.add_argument("--preset", default="released_14b", help="a model preset of configs/models/")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with a small --preset (to try the script)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none (cpu)"
    row = {"gpu": gpu, "torch": torch.__version__, "preset": args.preset}
    t0 = time.perf_counter()
    model = build_random_model(args.preset, args.device, getattr(torch, args.dtype))
    sync()
    row["build_s"] = round(time.perf_counter() - t0, 1)
    model.progress = False
    row["params_B"] = round(sum(p.numel() for p in model.model.parameters()) / 1e9, 3)
    image = Image.open(PARITY_IMAGE).convert("RGB")
    phases = [lambda: decode_figures(model, image, args.batch, args.tokens), lambda: roofline(model, row, args.device),
              lambda: generation_figures(model, image)]
    if not args.skip_save_load:
        phases.append(lambda: save_load_figures(model))
    for phase in phases:  # the row so far after each phase, so a run cut short still reports what it measured
        row.update(phase())
        if torch.cuda.is_available():
            row["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
