"""Decoding on the device: the fixed-shape step, batched answers, stop handling, CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from unimedvl_core.inference.decoding import DecodeStep
from unimedvl_core.inference.embedded import load_default_model
from unimedvl_core.modeling.attention import CachedAttention, DecodeAttention
from unimedvl_core.modeling.kv_cache import KVCache

from .conftest import PARITY


def _requests():
    image = Image.open(PARITY / "image448.png")
    images = [image.resize((s, s)) for s in (448, 224, 308, 140)]
    questions = [f"Is there a lesion in region {i}?" + " Please answer briefly." * i for i in range(4)]
    return images, questions


def test_decode_attention_equals_cached_attention_for_rows_of_different_lengths():
    torch.manual_seed(0)
    cache = KVCache(1, 3, 16, 2, 8, torch.float32, "cpu")
    lengths = [5, 9, 2]
    for b, n in enumerate(lengths):
        cache.keys[0][b, :, :n] = torch.randn(2, n, 8)
        cache.values[0][b, :, :n] = torch.randn(2, n, 8)
    cache.lengths = list(lengths)
    other = KVCache.stack([(cache, b, n) for b, n in enumerate(lengths)], extra_capacity=1)
    q, k, v = torch.randn(3, 4, 1, 8), torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8)
    static = DecodeAttention(cache, torch.tensor(lengths))
    static.prepare()
    expected = CachedAttention(other, 1, causal=True)(0, q, k, v)
    assert torch.allclose(static(0, q, k, v), expected, atol=1e-6)
    for b, n in enumerate(lengths):  # the new key went into each row's own next slot
        assert torch.equal(cache.keys[0][b, :, n], k[b, :, 0])


def test_batched_answers_equal_one_by_one(tiny_model):
    images, questions = _requests()
    one_by_one = [tiny_model.answer(i, q, max_new_tokens=12) for i, q in zip(images, questions)]
    assert tiny_model.answer_batch(images, questions, max_new_tokens=12) == one_by_one
    assert tiny_model.answer_batch(images, questions, max_new_tokens=12, batch_size=3) == one_by_one


def test_rows_stop_on_their_own_stop_token():
    """The embedded model answers phantom questions in a few tokens and stops: rows stop at different steps,
    and each batched answer equals the single answer."""
    from unimedvl_core.data.phantoms import render, sample_phantom

    model = load_default_model(progress=False)
    rng = __import__("numpy").random.default_rng(3)
    images = [render(sample_phantom(rng, "radiology", 64, count=c), "ct") for c in (0, 1, 2, 3)]
    report = "Write a radiology report for this CT image, with findings and an impression."
    questions = ["How many lesions are there?", report, "Is there a lesion?", report]
    single = [model.answer(i, q, max_new_tokens=60, return_dict=True) for i, q in zip(images, questions)]
    assert any(s.stopped_by == "stop_token" for s in single) and len({len(s.token_ids) for s in single}) > 1
    assert model.answer_batch(images, questions, max_new_tokens=60) == [s.text for s in single]
    reports = model.generate_reports(images[:2], max_new_tokens=30)
    assert reports == [model.generate_report(i, max_new_tokens=30) for i in images[:2]]


def test_streaming_gives_the_answer_in_pieces(tiny_model):
    pieces = []
    text = tiny_model.answer(*[x[0] for x in _requests()], max_new_tokens=16, streamer=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1


def test_answer_batch_checks_its_inputs(tiny_model):
    images, questions = _requests()
    with pytest.raises(ValueError, match="4 images but 3 questions"):
        tiny_model.answer_batch(images, questions[:3])
    with pytest.raises(ValueError, match="question must be a non-empty string"):
        tiny_model.answer_batch(images[:1], [" "])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_equals_eager_step():
    from unimedvl_core import UniMedVL

    from .conftest import PARITY_CKPT

    model = UniMedVL.from_pretrained(PARITY_CKPT, device="cuda", dtype=torch.bfloat16, progress=False)
    image, question = [x[0] for x in _requests()]
    eager = model.answer(image, question, max_new_tokens=8, output_logits=True)  # below the graph threshold
    graphed = model.answer(image, question, max_new_tokens=60, output_logits=True)
    n = min(len(eager.token_ids), len(graphed.token_ids))
    assert graphed.token_ids[:n] == eager.token_ids[:n]
    assert (graphed.logits[:n] - eager.logits[:n]).abs().max() < 5e-2  # bf16
    cache = KVCache(model.config.llm["num_hidden_layers"], 2, 32, model.config.llm["num_key_value_heads"],
                    model.config.llm["hidden_size"] // model.config.llm["num_attention_heads"], torch.bfloat16, "cuda")
    step = DecodeStep(model.model, cache, torch.tensor([3, 5], device="cuda"))
    tokens, positions = torch.tensor([10, 20], device="cuda"), torch.tensor([3, 5], device="cuda")
    reference = step.eager(tokens, positions).clone()
    assert step.capture(tokens, positions)
    assert torch.allclose(step(tokens, positions), reference, atol=1e-2)


def test_a_kept_decode_workspace_serves_prompts_of_other_lengths(tiny_model):
    """On CUDA decode caches are kept between calls (their captured step replays); the same workspace logic,
    run eagerly here, must give each request exactly its own answer."""
    from unimedvl_core.inference.decoding import _workspace, choose_tokens, decode_rows
    from unimedvl_core.inference.understanding import UnderstandingPipeline

    images, questions = _requests()
    pipeline, kept = UnderstandingPipeline(tiny_model), set()
    # three prompts of different lengths that fit one capacity bucket (both images resize to 378 x 378)
    for image, question in ((images[1], questions[0]), (images[2], questions[2]), (images[1], questions[3])):
        context, logits, position = pipeline.prefill([image], question)
        workspace = _workspace(tiny_model.model, context.cache, 1, context.length + 10)
        kept.add(id(workspace))
        step = workspace.load([(context.cache, 0, context.length)])
        result = decode_rows(step, logits[None], torch.tensor([position]), 10, [tiny_model.special.im_end],
                             lambda x: choose_tokens(x, False, 1.0, 1.0, None))
        assert result.token_ids[0] == tiny_model.answer(image, question, max_new_tokens=10, return_dict=True).token_ids
    assert len(kept) == 1  # one workspace, reused


def _llm_over_cache(net, embeds, positions, routing, causal, outputs=None, lengths=(5,)):
    """Run a block after cached prefixes of ``lengths`` (random keys); returns (hidden, cache)."""
    cfg = net.language_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = KVCache(cfg.num_hidden_layers, len(lengths), max(lengths) + embeds.shape[1], cfg.num_key_value_heads,
                    head_dim, torch.float32, "cpu")
    noise = torch.Generator().manual_seed(1)
    for layer in range(cache.num_layers):
        cache.keys[layer].normal_(generator=noise)
        cache.values[layer].normal_(generator=noise)
    cache.lengths = list(lengths)
    attend = CachedAttention(cache, embeds.shape[1], causal)
    return net.run_llm(embeds, positions, routing, attend, outputs), cache


@pytest.mark.parametrize("block", ["text", "image"])
@pytest.mark.parametrize("outputs", [0, 1, 3])
def test_last_rows_only_equal_the_full_forward(tiny_model, block, outputs):
    """``outputs=n`` (Context.run, docs/performance.md#unused-outputs) gives the full forward's last n hidden
    states and writes the same keys and values, for a causal text block and an image block whose last rows
    mix the generation expert (latents) and the understanding expert (the end marker)."""
    from unimedvl_core.modeling.qwen2_mot import ExpertRouting

    net = tiny_model.model
    length = 7
    embeds = torch.randn(1, length, net.config.llm["hidden_size"], generator=torch.Generator().manual_seed(0))
    positions = torch.arange(5, 5 + length)[None]
    routing = ExpertRouting.understanding() if block == "text" else ExpertRouting.image_block(length - 2)
    with torch.inference_mode():
        full, full_cache = _llm_over_cache(net, embeds, positions, routing, block == "text")
        last, last_cache = _llm_over_cache(net, embeds, positions, routing, block == "text", outputs)
    assert last.shape == (1, outputs, embeds.shape[2])
    torch.testing.assert_close(last, full[:, length - outputs:], rtol=1e-5, atol=1e-5)
    for layer in range(full_cache.num_layers):
        torch.testing.assert_close(last_cache.keys[layer], full_cache.keys[layer], rtol=0, atol=0)


def test_guidance_rows_of_different_lengths_attend_as_if_alone(tiny_model):
    """Rows with different cached lengths (guidance branches) attend unpadded, run by run: each row's result
    equals that row run alone over its own cache."""
    from unimedvl_core.modeling.qwen2_mot import ExpertRouting

    net = tiny_model.model
    embeds = torch.randn(3, 6, net.config.llm["hidden_size"], generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9, 15)[None].expand(3, -1)
    routing = ExpertRouting.image_block(4)
    with torch.inference_mode():
        together, cache = _llm_over_cache(net, embeds, positions, routing, False, lengths=(9, 9, 2))
        assert CachedAttention(cache, 6, causal=False).runs == [(0, 2, 9), (2, 3, 2)]
        for row, n in enumerate((9, 9, 2)):
            own = KVCache.stack([(cache, row, n)], extra_capacity=6)
            alone = net.run_llm(embeds[row:row + 1], positions[:1], routing, CachedAttention(own, 6, causal=False))
            torch.testing.assert_close(together[row:row + 1], alone, rtol=1e-5, atol=1e-5)
