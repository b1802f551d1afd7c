"""Our CPU inference against the published UniMedVL implementation, timed in the same run on one checkpoint.

    python benchmarks/bench_reference.py --reference /path/to/UniMedVL/codes --reference-site DIR
        [--ckpt CKPT] [--tasks vqa t2i edit] [--repeats 3] [--profile]

The reference pins transformers 4.49 (its environment.yaml) and does not import under ours (5.x), so it runs in
a worker process with DIR ahead of our site-packages. DIR holds what it needs that we do not have, installed
once with ``pip install --no-deps --target DIR transformers==4.49.0 "tokenizers<0.22" "huggingface_hub<1"
einops opencv-python-headless torchvision==X`` (X: the torchvision release of your torch, 0.28 for 2.13). The
two processes take turns, never run together. Both: CPU, fp32, 2 threads. The runtime patches the reference
needs on a CPU (no flash-attn, bf16 casts, its loader's fixed VAE geometry) are in ``load_reference``; none
of its files is changed. Tasks (settings: docs/sampling.md#defaults, prompts: the parity
fixture's, tests/fixtures/parity/README.md):

- vqa: image448.png, greedy, exactly 32 new tokens (no stop token);
- t2i: 128x128, the reference's 10-timestep schedule (our 9 evaluations), released text-to-image guidance;
- edit: image448.png at 448x448, 10 timesteps, released editing guidance, VAE posterior mean for both.

Each task first runs once on each side from the same initial noise and compares outputs (greedy ids equal;
final latents and uint8 images: max abs difference), then times reference and ours alternately
(``--repeats`` each, median). One JSON line per task. ``--profile`` adds where each side spends its time
(torch.profiler: self time per op group and the part outside any op, i.e. Python).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PARITY = REPO / "tests" / "fixtures" / "parity"
IMAGE = PARITY / "image448.png"
FIXTURE = json.loads((PARITY / "tiny_s0_expected.json").read_text())
NEW_TOKENS = 32
STEPS = 9  # our model evaluations; the reference's num_timesteps is STEPS + 1 (docs/sampling.md#schedule)
T2I_SIDE = 128
THREADS = 2

# Op groups for the profile (aten names as torch.profiler reports them).
OP_GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax", "aten::softmax"),
    "conv": ("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::conv2d",
             "aten::upsample", "aten::group_norm", "aten::native_group_norm"),
    "copy/index": ("aten::copy_", "aten::index", "aten::index_put", "aten::_index_put", "aten::cat", "aten::zeros",
                   "aten::new_zeros", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
                   "aten::fill_", "aten::zero_", "aten::empty", "aten::split", "aten::item",
                   "aten::_local_scalar_dense"),
}


def profile_summary(fn) -> dict:
    """Run ``fn`` once under torch.profiler: wall seconds, self seconds per op group, and the rest (Python and
    dispatch outside any aten op); the top ops by self time. The profiler itself slows small ops down."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    groups = dict.fromkeys([*OP_GROUPS, "other ops"], 0.0)
    for ev in events:
        name = next((g for g, prefixes in OP_GROUPS.items() if ev.key.startswith(prefixes)), "other ops")
        groups[name] += ev.self_cpu_time_total / 1e6
    in_ops = sum(groups.values())
    top = sorted(events, key=lambda ev: ev.self_cpu_time_total, reverse=True)[:8]
    # Op calls are counted too: on a busy machine each parallel op can stall on a descheduled thread, so
    # the count (independent of load) says as much as the seconds.
    return {"wall_s": round(wall, 3), "aten_calls": sum(ev.count for ev in events if ev.key.startswith("aten::")),
            **{f"{k}_s": round(v, 3) for k, v in groups.items()},
            "outside_ops_s": round(max(wall - in_ops, 0.0), 3),
            "top_ops": [[ev.key, ev.count, round(ev.self_cpu_time_total / 1e6, 3)] for ev in top]}


# ----- the reference, in the worker process -----

def flash_attn_shim():
    """A module standing in for flash_attn (CUDA only): ``flash_attn_varlen_func`` as one
    scaled_dot_product_attention per packed sequence. Causal masks are bottom-right aligned, as flash-attn's
    are when a query block follows cached keys. Grouped heads as flash-attn treats them, without copying the
    keys: where no causal mask is needed (non-causal blocks, one-token decode steps) the query heads of a group
    ride as rows of one head over its key/value head; a causal block repeats the key/value heads. Either way
    PyTorch's fused CPU kernel runs (``enable_gqa`` falls back to the unfused one, which materialises the
    scores: about 2x slower on the editing step). Ours, not flash-attn's code."""
    import importlib.machinery
    import types

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, causal=False, **_):
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for i in range(len(cq) - 1):  # (1, heads, length, dim): SDPA's fused CPU kernel takes 4-d inputs only
            qi, ki, vi = (x[a:b].transpose(0, 1)[None] for x, a, b in
                          ((q, cq[i], cq[i + 1]), (k, ck[i], ck[i + 1]), (v, ck[i], ck[i + 1])))
            (_, heads, lq, dim), (_, kv_heads, lk, _) = qi.shape, ki.shape
            groups = heads // kv_heads
            if not causal or lq == 1:  # query head h uses key/value head h // groups
                out = torch.nn.functional.scaled_dot_product_attention(
                    qi.reshape(1, kv_heads, groups * lq, dim), ki, vi, scale=softmax_scale).reshape(1, heads, lq, dim)
            else:
                ki, vi = ki.repeat_interleave(groups, 1), vi.repeat_interleave(groups, 1)
                square = lq == lk  # then top-left (SDPA's) and bottom-right alignment agree
                mask = None if square else torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
                out = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=square,
                                                                       scale=softmax_scale)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)

    module = types.ModuleType("flash_attn")
    # transformers probes optional packages with importlib.util.find_spec, which needs a spec.
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_varlen_func = flash_attn_varlen_func
    return module


def fp32_torch():
    """A stand-in for the ``torch`` module whose ``bfloat16`` is float32: the reference hard-casts q/k/v and the
    generation expert's activations to bf16 (for flash-attn on CUDA); bound as ``torch`` in its modules, the
    same lines keep fp32, so the benchmark compares fp32 with fp32. A copy of torch's namespace, so other
    lookups cost what they cost before."""
    import types

    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)
    proxy.bfloat16 = torch.float32
    return proxy


def import_torchvision() -> None:
    """The reference's image transforms need torchvision. PyPI's Linux wheels are built against CUDA torch; with
    a CPU-only torch their compiled ops do not load, and torchvision's import then fails registering fake
    kernels for two of those ops (nms, qnms), which the transforms never use. Skip those registrations."""
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    register_fake = torch.library.register_fake
    torch.library.register_fake = lambda op, *a, **k: (
        (lambda fn: fn) if isinstance(op, str) and op.startswith("torchvision::") else register_fake(op, *a, **k))
    try:
        import torchvision  # noqa: F401, F811
    finally:
        torch.library.register_fake = register_fake


def import_reference(codes: Path):
    """Import the reference with the runtime patches it needs on a CPU without flash-attn."""
    import_torchvision()
    if "flash_attn" not in sys.modules:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            sys.modules["flash_attn"] = flash_attn_shim()
    sys.path.insert(0, str(codes))
    # build_transform() (their VQA transform) opens "codes/data/default.yaml" relative to the working folder.
    os.chdir(codes.parent)
    import modeling.unimedvl.qwen2_navit as qwen2_navit
    import modeling.unimedvl.siglip_navit as siglip_navit

    for module in (qwen2_navit, siglip_navit):
        module.torch = fp32_torch()


def released_tokenizer_view(ckpt: Path, folder: Path) -> Path:
    """The checkpoint as the reference's transformers 4.49 reads it. Checkpoints we save carry a
    tokenizer_config.json that 4.49 reads (docs/checkpoint.md#tokenizer-files); one written by transformers 5
    alone (``extra_special_tokens`` a list) is shown in the portable form in a folder of links to the other
    files, the checkpoint itself untouched."""
    from unimedvl_core.modeling.tokenizer import make_tokenizer_config_portable

    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    if not isinstance(config.get("extra_special_tokens"), list):
        return ckpt
    for item in ckpt.iterdir():
        if item.name != "tokenizer_config.json":
            (folder / item.name).symlink_to(item)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    make_tokenizer_config_portable(folder)
    return folder


def load_reference(codes: Path, ckpt: Path):
    """Build and load the reference as its released scripts do (interactive_image_generator.py: config tweaks,
    empty-weight build, tokenizer with added tokens, load_checkpoint_and_dispatch of ema.safetensors), but in
    fp32 on the CPU instead of bf16 on a GPU (and without writing an ema_bf16.safetensors next to it)."""
    import_reference(codes)
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from data.data_utils import add_special_tokens
    from data.transforms import ImageTransform
    from eval.vlm.utils import build_transform
    from inferencer import InterleaveInferencer
    from modeling import autoencoder
    from modeling.qwen2 import Qwen2Tokenizer
    from modeling.unimedvl import (
        Bagel,
        BagelConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    settings = json.loads((ckpt / "config.json").read_text())
    llm_config = Qwen2Config.from_json_file(str(ckpt / "llm_config.json"))
    llm_config.qk_norm, llm_config.tie_word_embeddings, llm_config.layer_module = True, False, "Qwen2MoTDecoderLayer"
    vit_config = SiglipVisionConfig.from_json_file(str(ckpt / "vit_config.json"))
    vit_config.rope, vit_config.num_hidden_layers = False, vit_config.num_hidden_layers - 1
    # load_ae hard-codes the released (FLUX) VAE geometry; give it the checkpoint's (config.json vae_config).
    checkpoint_vae = dict(settings["vae_config"], downsample=8)
    released_params = autoencoder.AutoEncoderParams
    autoencoder.AutoEncoderParams = lambda **_released: released_params(**checkpoint_vae)
    vae_model, vae_config = autoencoder.load_ae(local_path=str(ckpt / "ae.safetensors"))
    autoencoder.AutoEncoderParams = released_params
    # Posterior mean, as our edit_image's default (the reference samples it; same cost, comparable outputs).
    vae_model.reg.sample = False
    config = BagelConfig(visual_gen=True, visual_und=True, llm_config=llm_config, vit_config=vit_config,
                         vae_config=vae_config, **{k: settings[k] for k in (
                             "vit_max_num_patch_per_side", "connector_act", "latent_patch_size", "max_latent_size",
                             "interpolate_pos")})
    with init_empty_weights():
        model = Bagel(Qwen2ForCausalLM(llm_config), SiglipVisionModel(vit_config), config, vae_model=vae_model)
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear(vit_config, meta=True)
    with tempfile.TemporaryDirectory() as view:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(released_tokenizer_view(ckpt, Path(view))))
    tokenizer, new_token_ids, _ = add_special_tokens(tokenizer)
    model = load_checkpoint_and_dispatch(model, checkpoint=str(ckpt / "ema.safetensors"), device_map={"": "cpu"},
                                         offload_buffers=False, dtype=torch.float32, force_hooks=False).eval()
    # The editing script's transforms (its DEFAULT_CONFIG vae/vit_transform_size); VQA uses build_transform().
    inferencer = InterleaveInferencer(model, vae_model, tokenizer, ImageTransform(1024, 32, 16),
                                      ImageTransform(980, 387, 14), new_token_ids)
    return inferencer, build_transform()


class ReferenceTasks:
    """The three tasks driven through the reference's own entry points: ``Bagel.chat`` (the released VQA
    script) and ``InterleaveInferencer.interleave_inference`` (the released generation/editing script)."""

    def __init__(self, codes: Path, ckpt: Path):
        from PIL import Image

        self.inferencer, self.vqa_transform = load_reference(codes, ckpt)
        self.image = Image.open(IMAGE).convert("RGB")
        self.noise, self.captured = None, {}
        model = self.inferencer.model
        released_generate_text, released_prepare, released_generate = (
            model.generate_text, model.prepare_vae_latent, model.generate_image)

        # Runtime wrappers on the instance (theirs run unchanged inside): chat stops at <|im_end|>; the
        # benchmark decodes a fixed number of tokens, so the stop id is dropped. The initial noise (drawn from
        # the global RNG in prepare_vae_latent) is replaced by the one both sides share, and the final latent
        # tokens are kept for the comparison.
        def generate_text(**kwargs):
            self.captured["ids"] = ids = released_generate_text(**{**kwargs, "end_token_id": None})
            # Random weights pick ids past the tokenizer (the small preset's LM head has 4096 rows, its
            # tokenizer 527 tokens), which the slow tokenizer cannot decode; chat only decodes them to text.
            return ids.masked_fill(ids >= len(self.inferencer.tokenizer), self.inferencer.tokenizer.pad_token_id)

        def prepare_vae_latent(*args, **kwargs):
            generation_input = released_prepare(*args, **kwargs)
            if self.noise is not None:
                generation_input["packed_init_noises"] = self.noise.clone()
            return generation_input

        def generate_image(**kwargs):
            self.captured["latent"] = released_generate(**kwargs)[0]
            return [self.captured["latent"]]

        model.generate_text, model.prepare_vae_latent, model.generate_image = (
            generate_text, prepare_vae_latent, generate_image)

    def run(self, task: str, settings: dict) -> dict:
        """Run one task; returns what the comparison needs (ids, or final latent tokens and the uint8 image)."""
        import numpy as np
        from eval.vlm.utils import process_conversation

        inf = self.inferencer
        if task == "vqa":
            images, conversation = process_conversation([self.image], FIXTURE["vqa"]["question"])
            inf.model.chat(inf.tokenizer, inf.new_token_ids, self.vqa_transform, images=images, prompt=conversation,
                           max_length=NEW_TOKENS + 1, do_sample=False)
            return {"ids": self.captured["ids"][1:, 0].tolist()}  # the first row is the <|im_start|> fed in
        if task == "t2i":
            inputs, shape = [FIXTURE["t2i"]["prompt"]], (T2I_SIDE, T2I_SIDE)
        else:
            inputs = [self.image, FIXTURE["edit"]["instruction"]]
            shape = inf._calculate_target_size_with_aspect_ratio(*self.image.size)
        out = inf.interleave_inference(inputs, understanding_output=False, num_timesteps=STEPS + 1,
                                       image_shapes=shape, **settings)
        return {"latent": self.captured["latent"].float(), "image": torch.from_numpy(np.asarray(out[-1]).copy())}


def worker(codes: Path, ckpt: Path) -> None:
    """Serve requests from the parent, one JSON line each on stdin: load once, then run/time/profile tasks."""
    torch.set_num_threads(THREADS)
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the reference prints (load warnings, progress bars): keep them off the reply channel
    sys.stdout = sys.stderr
    tasks = ReferenceTasks(codes, ckpt)
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        tasks.noise = torch.load(request["noise"]) if request.get("noise") else None
        run = functools.partial(tasks.run, request["task"], request["settings"])
        if request.get("profile"):
            answer = {"profile": profile_summary(run)}
        else:
            t0 = time.perf_counter()
            result = run()
            answer = {"seconds": time.perf_counter() - t0}
            if request.get("out"):
                torch.save(result, request["out"])
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


# ----- the parent: ours in process, the reference through the worker -----

class ReferenceWorker:
    def __init__(self, codes: Path, ckpt: Path, site: Path, log):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), OMP_NUM_THREADS=str(THREADS),
                   TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--reference", str(codes),
                                      "--ckpt", str(ckpt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, env=env, text=True)
        self.log = log
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = Path(self.log.name).read_text()[-3000:]
            raise SystemExit(f"the reference worker stopped; its log ends with:\n{tail}")
        return json.loads(line)

    def request(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def guidance(task: str) -> dict:
    """Our defaults for the task, which are the released scripts' (docs/sampling.md#defaults), as the
    reference's keyword arguments; the step count is set by the benchmark."""
    from dataclasses import asdict

    from unimedvl_core.inference.model import EDIT, T2I

    settings = asdict(T2I if task == "t2i" else EDIT)
    settings.pop("num_inference_steps")
    return settings


def our_tasks(model, noise: dict) -> dict:
    """Our side of each task: a function of the output type (generation) that runs it once."""
    from PIL import Image

    image = Image.open(IMAGE)
    return {
        "vqa": lambda _=None: model.answer(image, FIXTURE["vqa"]["question"], max_new_tokens=NEW_TOKENS,
                                           stop_token_ids=[-1], return_dict=True).token_ids,
        "t2i": lambda output_type="np": model.generate_image(
            FIXTURE["t2i"]["prompt"], height=T2I_SIDE, width=T2I_SIDE, num_inference_steps=STEPS,
            latents=noise["t2i"], output_type=output_type),
        "edit": lambda output_type="np": model.edit_image(
            image, FIXTURE["edit"]["instruction"], num_inference_steps=STEPS, latents=noise["edit"],
            output_type=output_type),
    }


def initial_noise(model, task: str) -> torch.Tensor | None:
    """Spatial latents (z, H/8, W/8), the same for both sides (seed 0)."""
    from PIL import Image

    if task == "vqa":
        return None
    width, height = (T2I_SIDE, T2I_SIDE) if task == "t2i" else Image.open(IMAGE).size  # edits keep the size
    z = model.config.vae.z_channels
    return torch.randn(z, height // 8, width // 8, generator=torch.Generator().manual_seed(0))


TARGETS = {"vqa": 2.0, "t2i": 2.0, "edit": 1.5}  # reference seconds / ours, at least


def compare(task: str, ours, worker: ReferenceWorker, request: dict, out: Path, patch: int) -> dict:
    """One run of each side on the same input and noise (also the warm-up): how far apart the outputs are."""
    from unimedvl_core.modeling.vae import patchify_latent

    worker.request(**request, out=str(out))
    ref = torch.load(out)
    if task == "vqa":
        ids = ours()
        return {"greedy_ids_equal": ids == ref["ids"], "first_ids_ours": ids[:6], "first_ids_reference": ref["ids"][:6]}
    latent = patchify_latent(ours("latent"), patch)
    image = torch.from_numpy(ours("np")).int()
    return {"latent_max_abs_diff": float((latent - ref["latent"]).abs().max()),
            "latent_max_abs": float(ref["latent"].abs().max()),
            "image_max_abs_diff_u8": int((image - ref["image"].int()).abs().max())}


def time_alternately(ours, worker: ReferenceWorker, request: dict, repeats: int) -> tuple[list, list]:
    reference, our = [], []
    for _ in range(repeats):
        reference.append(worker.request(**request)["seconds"])
        t0 = time.perf_counter()
        ours()
        our.append(time.perf_counter() - t0)
    return reference, our


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                "unknown CPU")
    return f"{name}, {os.cpu_count()} cores, {THREADS} threads, load {os.getloadavg()[0]:.2f}"


def task_setup(task: str, model, tmp: Path) -> tuple:
    """Our run function for the task, and the worker request for the same task on the same noise."""
    from unimedvl_core.modeling.vae import patchify_latent

    noise = initial_noise(model, task)
    request = {"task": task, "settings": guidance(task) if task != "vqa" else {}, "noise": None}
    if noise is not None:
        request["noise"] = str(tmp / f"{task}_noise.pt")
        torch.save(patchify_latent(noise, model.config.latent_patch_size), request["noise"])
    return our_tasks(model, {task: noise})[task], request


def bench_task(task: str, model, worker: ReferenceWorker, tmp: Path, repeats: int) -> dict:
    ours, request = task_setup(task, model, tmp)
    check = compare(task, ours, worker, request, tmp / f"{task}_reference.pt", model.config.latent_patch_size)
    reference, our = time_alternately(ours, worker, request, repeats)
    ratio = statistics.median(reference) / statistics.median(our)
    return {"task": task, "reference_s": round(statistics.median(reference), 3),
            "ours_s": round(statistics.median(our), 3), "speedup": round(ratio, 2), "target": TARGETS[task],
            "meets_target": ratio >= TARGETS[task], "reference_runs_s": [round(t, 3) for t in reference],
            "ours_runs_s": [round(t, 3) for t in our], "check": check, "machine": machine()}


def profile_task(task: str, model, worker: ReferenceWorker, tmp: Path) -> list[dict]:
    ours, request = task_setup(task, model, tmp)
    return [{"profile": task, "side": "reference", **worker.request(**request, profile=True)["profile"]},
            {"profile": task, "side": "ours", **profile_summary(ours)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="the codes/ folder of a UniMedVL checkout")
    parser.add_argument("--reference-site", type=Path, help="a --target folder with transformers 4.49 (see above)")
    parser.add_argument("--ckpt", type=Path, help="a checkpoint in the released layout (default: the small preset)")
    parser.add_argument("--tasks", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.reference.resolve(), args.ckpt.resolve())
    if not (args.reference / "modeling" / "unimedvl" / "bagel.py").is_file():
        raise SystemExit(f"--reference {args.reference} is not the codes/ folder of a UniMedVL checkout")
    if args.reference_site is None or not (args.reference_site / "transformers").is_dir():
        raise SystemExit("--reference-site must name a folder with transformers 4.49 installed (see --help)")
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run_all(args, args.ckpt or default_checkpoint(tmp), tmp)


def default_checkpoint(tmp: Path) -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_inference import checkpoint_for

    return checkpoint_for("small", tmp)


def run_all(args, ckpt: Path, tmp: Path) -> None:
    from unimedvl_core import UniMedVL

    model = UniMedVL.from_pretrained(ckpt, device="cpu", dtype=torch.float32, progress=False)
    model.progress = False
    with open(tmp / "reference.log", "w") as log:
        worker = ReferenceWorker(args.reference.resolve(), ckpt.resolve(), args.reference_site.resolve(), log)
        try:
            for task in args.tasks:
                print(json.dumps(bench_task(task, model, worker, tmp, args.repeats)), flush=True)
            for task in args.tasks if args.profile else []:
                for row in profile_task(task, model, worker, tmp):
                    print(json.dumps(row), flush=True)
        finally:
            worker.close()


if __name__ == "__main__":
    main()
