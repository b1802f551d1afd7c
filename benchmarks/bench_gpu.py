"""GPU figures at the released 14.6B geometry (random bf16 weights), through the public API.

    python benchmarks/bench_gpu.py [--skip-save-load] [--batch 16]
    python benchmarks/bench_gpu.py --modes bf16,task,int8,nf4,fp8,nf4+task [--steps 20]

Prints a JSON line after each phase (the last one holds everything): build seconds; VQA prefill ms
(448x448 image + question, up to the first token); decode tokens/s at batch 1 and at ``--batch`` (all rows
together) with the fraction of the memory roofline (weight bytes one decoding step reads / the measured
device-to-device copy bandwidth); VQA answers/s at ``--batch`` against one by one; text-to-image 512x512
and 1024x1024 and editing 512x512 at 49 steps (the published schedule); peak GPU memory; save and load
seconds. Needs one CUDA GPU and no dataset: the tokenizer is the embedded model's (its ids fit the released
vocabulary), the weights are random.

``--modes`` instead measures each loading mode (docs/quantization.md): ``bf16`` (full residency), ``task``
(task-aware residency), ``int8``/``nf4``/``fp8`` (quantised weights) and combinations such as ``int8+task``.
For each mode it prints one JSON line per task (VQA, report, text-to-image 1024x1024, edit 512x512): seconds,
peak GPU memory of that task, device weight bytes, and for task residency the seconds of the phase switch
before the task. The model is rebuilt per mode, placing each tensor as ``from_pretrained`` does (quantised
on the device layer by layer; host memory for the moving experts).
"""

from __future__ import annotations

import argparse
import gc
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


def build_random_model(preset: str = "released_14b", device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                       quantization: str | None = None, residency: str = "all"):
    """A model preset (the released geometry by default) with random weights, built directly on the device
    (seconds, not minutes), each tensor then placed as ``from_pretrained`` places it for the mode."""
    from accelerate.utils import set_module_tensor_to_device

    from unimedvl_core import UniMedVL
    from unimedvl_core.inference.components import loading_placement
    from unimedvl_core.io.checkpoint import build_empty_model, finish_tensor
    from unimedvl_core.modeling.config import UniMedVLConfig
    from unimedvl_core.modeling.tokenizer import load_tokenizer
    from unimedvl_core.modeling.vae import build_vae

    config = UniMedVLConfig.from_preset(REPO / "configs" / "models" / f"{preset}.json")
    model = build_empty_model(config)  # parameters on the meta device, buffers (rotary frequencies) real
    placement = loading_placement(quantization, residency, torch.device(device), None)
    generator = torch.Generator(device).manual_seed(0)
    for name, param in list(model.named_parameters()):
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if param.ndim == 1:  # norms 1, biases 0: keeps activations in range over 28 layers
            value.fill_(1.0 if "norm" in name else 0.0)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
        del value
        finish_tensor(model, name, placement.get("quantize"), placement.get("on_host"))
    for name, buffer in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device, value=buffer)
    model.eval().requires_grad_(False)
    wrong = {p.dtype for p in model.parameters()} - {dtype}
    if wrong:
        raise RuntimeError(f"parameters built as {wrong}, not {dtype}")
    vae = build_vae(config.vae).to(device=device, dtype=dtype).eval().requires_grad_(False)
    built = UniMedVL(model, vae, load_tokenizer(TOKENIZER_DIR), config, tokenizer_dir=TOKENIZER_DIR,
                     name="released geometry, random weights")
    built.use_mode(quantization, residency, torch.device(device))
    return built


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


def parse_mode(text: str) -> tuple[str | None, str]:
    """``bf16`` | ``task`` | ``int8`` | ``nf4`` | ``fp8``, optionally ``+task``: (quantization, residency)."""
    parts = text.split("+")
    residency = "task" if "task" in parts else "all"
    rest = [p for p in parts if p not in ("task", "bf16")]
    if len(rest) > 1 or (rest and rest[0] not in ("int8", "nf4", "fp8")):
        raise SystemExit(f"unknown mode {text!r}: use bf16, task, int8, nf4, fp8, or e.g. int8+task")
    return (rest[0] if rest else None), residency


def mode_tasks(model, image, steps: int) -> dict:
    """The four measured tasks, each a function running it once (sides capped by the preset's largest)."""
    gen = dict(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), progress=False)
    big, edit = (min(side, model.config.max_image_side) for side in (1024, 512))
    return {"vqa": lambda: model.answer(image, QUESTION, max_new_tokens=64),
            "report": lambda: model.generate_report(image, modality="CT", max_new_tokens=128),
            f"t2i_{big}": lambda: model.generate_image("Axial CT of the chest with two nodules.", height=big,
                                                       width=big, **gen),
            f"edit_{edit}": lambda: model.edit_image(image.resize((edit, edit)), "Translate this T2 image to FLAIR.",
                                                     **gen)}


def switch_seconds(model, task: str) -> float | None:
    """Seconds to enter the phase ``task`` runs in (task residency only), synchronised."""
    from unimedvl_core.inference.residency import GENERATION, UNDERSTANDING

    if model.residency is None:
        return None
    phase = UNDERSTANDING if task in ("vqa", "report") else GENERATION
    sync()
    t0 = time.perf_counter()
    model.residency.enter(phase)
    sync()
    return round(time.perf_counter() - t0, 3)


def gpu_gb(peak: bool = False) -> float | None:
    """Allocated (or peak allocated) GPU memory in GB; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    return round((torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 1e9, 2)


def measure_modes(args, image) -> None:
    on_gpu = args.device.startswith("cuda")
    for text in args.modes.split(","):
        quantization, residency = parse_mode(text)
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = build_random_model(args.preset, args.device, getattr(torch, args.dtype), quantization, residency)
        sync()
        base = {"mode": text, "gpu": torch.cuda.get_device_name(0) if on_gpu else "none (cpu)",
                "build_s": round(time.perf_counter() - t0, 1), "weights_on_gpu_GB": gpu_gb()}
        model.progress = False
        model.answer(image, QUESTION, max_new_tokens=1)  # warm-up: kernels, allocator, both phases
        warm = min(256, model.config.max_image_side)
        model.generate_image("warm-up", height=warm, width=warm, num_inference_steps=2, progress=False)
        for task, run in mode_tasks(model, image, args.steps).items():
            switch = switch_seconds(model, task)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
            row = {**base, "task": task, "switch_s": switch, "seconds": round(seconds(run, warmup=False), 2),
                   "peak_gpu_GB": gpu_gb(peak=True)}
            if model.residency is not None:
                row["streamed_layers"] = model.residency.streamed
            print(json.dumps(row), flush=True)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="decoded tokens per measurement")
    parser.add_argument("--skip-save-load", action="store_true")
    parser.add_argument("--preset", default="released_14b", help="a model preset of configs/models/")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu with a small --preset (to try the script)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--modes", default=None, help="measure these loading modes instead, e.g. bf16,task,int8,nf4")
    parser.add_argument("--steps", type=int, default=49, help="sampling steps of the --modes generation tasks")
    args = parser.parse_args()
    if args.modes:
        measure_modes(args, Image.open(PARITY_IMAGE).convert("RGB"))
        return
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
