"""The pieces of benchmarks/bench_reference.py that stand in for what the reference needs on a CPU: the
flash-attn replacement, the fp32 torch namespace and the tokenizer view. No reference checkout is needed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_reference", REPO / "benchmarks" / "bench_reference.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def naive_attention(q, k, v, causal: bool) -> torch.Tensor:
    """One sequence, (L, H, D) layout, grouped heads by repetition, causal bottom-right aligned as flash-attn."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    if causal:
        lq, lk = q.shape[0], k.shape[0]
        visible = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_shim_matches_attention_per_packed_sequence(causal):
    g = torch.Generator().manual_seed(0)
    q_lens, k_lens = [3, 1, 5], [7, 4, 5]  # queries after cached keys, a decode step, a square block
    q = torch.randn(sum(q_lens), 4, 8, generator=g)
    k, v = (torch.randn(sum(k_lens), 2, 8, generator=g) for _ in range(2))
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)  # noqa: E731
    out = bench.flash_attn_shim().flash_attn_varlen_func(q, k, v, cu(q_lens), cu(k_lens), max(q_lens), max(k_lens),
                                                         causal=causal)
    expected, qs, ks = [], 0, 0
    for lq, lk in zip(q_lens, k_lens):
        expected.append(naive_attention(q[qs:qs + lq], k[ks:ks + lk], v[ks:ks + lk], causal))
        qs, ks = qs + lq, ks + lk
    assert out.shape == q.shape
    assert torch.allclose(out, torch.cat(expected), atol=1e-5)


def test_fp32_torch_keeps_bf16_casts_in_float32():
    proxy = bench.fp32_torch()
    assert proxy.zeros(2).to(proxy.bfloat16).dtype == torch.float32
    assert proxy.nn is torch.nn and proxy.float16 is torch.float16


def test_tokenizer_view_has_the_ids_of_our_tokenizer(tmp_path):
    from unimedvl_core.modeling.tokenizer import load_tokenizer

    ours = load_tokenizer(REPO / "unimedvl_core" / "default_model")
    ckpt = tmp_path / "v5"
    ours.save_pretrained(str(ckpt))  # transformers 5's own form, which 4.49 cannot read
    assert isinstance(json.loads((ckpt / "tokenizer_config.json").read_text())["extra_special_tokens"], list)
    (tmp_path / "view").mkdir()
    view = bench.released_tokenizer_view(ckpt, tmp_path / "view")
    config = json.loads((view / "tokenizer_config.json").read_text())
    assert view != ckpt
    assert isinstance(config["additional_special_tokens"], list) and "extra_special_tokens" not in config
    assert config["added_tokens_decoder"]
    for token_id, token in config["added_tokens_decoder"].items():
        assert ours.convert_tokens_to_ids(token["content"]) == int(token_id)
    assert sorted(p.name for p in view.iterdir()) == sorted(p.name for p in ckpt.iterdir())
    assert json.loads((ckpt / "tokenizer_config.json").read_text()).get("extra_special_tokens") is not None
    # Checkpoints in the 4.x form (ours as saved, the parity fixture) are used as they are.
    for portable in (REPO / "unimedvl_core" / "default_model", REPO / "tests" / "fixtures" / "parity" / "tiny_s0"):
        assert bench.released_tokenizer_view(portable, tmp_path) == portable
