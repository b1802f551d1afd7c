"""Token-by-token decoding of many rows at once, kept on the device.

After the prompts are prefilled, every decoding step is one fixed-shape forward of all rows
(``DecodeAttention``: the cache is written at tensor-held lengths), the next tokens are chosen on the
device, and the host looks at them only every few steps to see whether every row has stopped. On CUDA
the step is captured once as a CUDA graph and replayed, so a step costs one launch instead of hundreds;
elsewhere (and when capture is not possible) the same step runs eagerly.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..modeling.attention import DecodeAttention
from ..modeling.kv_cache import KVCache
from ..modeling.qwen2_mot import ExpertRouting
from ..modeling.unimedvl import UniMedVLModel

__all__ = ["DecodeStep", "DecodeResult", "decode_rows", "choose_tokens", "decode_step_for", "forget_workspaces"]

log = logging.getLogger(__name__)

# On CUDA, rows are checked for having stopped every this many steps (a check makes the host wait for
# the device); on the CPU there is nothing to wait for, so every step.
CUDA_STOP_CHECK_INTERVAL = 4
# CUDA-graph capture costs a few warm-up forwards; below this many steps eager decoding is as fast.
GRAPH_MIN_STEPS = 16
# Kept decode caches are this many slots longer than needed at most, so one captured step serves many
# prompt lengths; a model keeps this many (rows, capacity) workspaces, the least recently used dropped.
CAPACITY_BUCKET = 512
MAX_WORKSPACES = 2


class DecodeStep:
    """``logits = step(tokens, positions)``: rows' next tokens (rows,) at rope ``positions`` (rows,) are
    written into ``cache`` at ``lengths`` and their next-token logits (rows, vocab) returned in fp32."""

    def __init__(self, model: UniMedVLModel, cache: KVCache, lengths: torch.Tensor):
        self.model, self.cache = model, cache
        self.attention = DecodeAttention(cache, lengths)
        self.graph = None
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.output: torch.Tensor | None = None

    def eager(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.attention.prepare()
        embeds = self.model.embed_tokens(tokens)[:, None]
        hidden = self.model.run_llm(embeds, positions[:, None], ExpertRouting.understanding(), self.attention)
        return self.model.text_logits(hidden[:, 0]).float()

    def capture(self, tokens: torch.Tensor, positions: torch.Tensor) -> bool:
        """Record the step as a CUDA graph over static copies of the inputs; False when it cannot be."""
        if tokens.device.type != "cuda" or len(set(self.cache.devices)) > 1:
            return False
        try:
            self.inputs = (tokens.clone(), positions.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (allocator, kernel selection)
                for _ in range(2):
                    self.eager(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.output = self.eager(*self.inputs)
            self.graph = graph
            return True
        except RuntimeError as err:  # e.g. an operation that cannot be captured: decode eagerly
            log.warning("CUDA graph capture failed (%s); decoding without graphs", err)
            self.graph = None
            return False

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self.eager(tokens, positions)
        self.inputs[0].copy_(tokens)
        self.inputs[1].copy_(positions)
        self.graph.replay()
        return self.output


class _Workspace:
    """A decode cache of fixed rows x capacity kept between calls with its step, so that a CUDA graph
    captured once replays for every later request of that shape."""

    def __init__(self, model: UniMedVLModel, like: KVCache, rows: int, capacity: int):
        _, kv_heads, _, head_dim = like.keys[0].shape
        self.cache = KVCache(like.num_layers, rows, capacity, kv_heads, head_dim, like.dtype, like.devices)
        self.step = DecodeStep(model, self.cache, torch.zeros(rows, dtype=torch.long, device=like.device))

    def load(self, sources: Sequence[tuple[KVCache, int, int]]) -> DecodeStep:
        self.cache.fill(sources)
        self.step.attention.lengths.copy_(torch.tensor([n for _, _, n in sources]))
        return self.step


_WORKSPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _workspace(model: UniMedVLModel, like: KVCache, rows: int, need: int) -> _Workspace:
    capacity = -(-need // CAPACITY_BUCKET) * CAPACITY_BUCKET
    kept = _WORKSPACES.setdefault(model, OrderedDict())
    key = (rows, capacity, like.dtype, tuple(like.devices))
    if key not in kept:
        if len(kept) >= MAX_WORKSPACES:
            kept.popitem(last=False)
        kept[key] = _Workspace(model, like, rows, capacity)
    kept.move_to_end(key)
    return kept[key]


def decode_step_for(model: UniMedVLModel, sources: Sequence[tuple[KVCache, int, int]],
                    max_new_tokens: int) -> DecodeStep:
    """A decode step over the prefilled rows ``(cache, row, length)`` with room for ``max_new_tokens`` more:
    on CUDA a kept workspace whose captured graph replays across calls; elsewhere the prompt's own cache
    (one row) or a stack of the rows."""
    first = sources[0][0]
    need = max(n for _, _, n in sources) + max_new_tokens
    lengths = torch.tensor([n for _, _, n in sources], device=first.device)
    if first.device.type == "cuda" and max_new_tokens > GRAPH_MIN_STEPS and len(set(first.devices)) == 1:
        return _workspace(model, first, len(sources), need).load(sources)
    if len(sources) == 1 and sources[0][1] == 0 and first.capacity >= need:
        return DecodeStep(model, first, lengths)
    return DecodeStep(model, KVCache.stack(sources, max_new_tokens), lengths)


def choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token of each row (rows,) from logits (rows, vocab): argmax on the device, or a draw from
    softmax(logits / temperature) restricted to the top-p mass (the generator's device draws)."""
    if not do_sample:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, -1) - sorted_probs >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    gen_device = generator.device if generator is not None else probs.device
    drawn = torch.multinomial(probs.to(gen_device), 1, generator=generator)[:, 0]
    return drawn.to(logits.device)


@dataclass
class DecodeResult:
    token_ids: list[list[int]]          # per row, without the stop token
    stopped: list[bool]                 # per row: ended by a stop token (else by the length limit)
    logits: list[torch.Tensor] | None   # per row (steps, vocab) on the CPU, when asked for


@dataclass
class _Run:
    chosen: list[torch.Tensor]
    logits: list[torch.Tensor]
    stopped: torch.Tensor


def _trim(run: _Run, rows: int, want_logits: bool) -> DecodeResult:
    chosen = torch.stack(run.chosen, dim=1).cpu() if run.chosen else torch.zeros(rows, 0, dtype=torch.long)
    stop_at = run.stopped.cpu()
    ids, stopped, logits = [], [], []
    for b in range(rows):
        end = int(stop_at[b]) if int(stop_at[b]) >= 0 else chosen.shape[1]
        ids.append(chosen[b, :end].tolist())
        stopped.append(int(stop_at[b]) >= 0)
        if want_logits:
            logits.append(torch.stack([step[b] for step in run.logits[: end + (1 if stopped[b] else 0)]]).cpu())
    return DecodeResult(ids, stopped, logits if want_logits else None)


def decode_rows(step: DecodeStep, first_logits: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                stop_ids: Sequence[int], choose: Callable[[torch.Tensor], torch.Tensor],
                on_tokens: Callable[[torch.Tensor], None] | None = None, keep_logits: bool = False) -> DecodeResult:
    """Decode every row from its first logits (rows, vocab) until each chose a stop token or
    ``max_new_tokens`` tokens were chosen. ``positions`` are the rows' rope positions of the first chosen
    token; ``step.attention.lengths`` its cache slots (advanced in place). ``on_tokens`` sees each step's
    tokens (rows,) as they are chosen (streaming; it makes the host wait every step)."""
    rows, device = first_logits.shape[0], first_logits.device
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    run = _Run([], [], torch.full((rows,), -1, dtype=torch.long, device=device))
    lengths, logits = step.attention.lengths, first_logits
    interval = CUDA_STOP_CHECK_INTERVAL if device.type == "cuda" else 1
    if step.graph is None and max_new_tokens > GRAPH_MIN_STEPS:
        step.capture(torch.argmax(logits, dim=-1), positions)  # any tokens: the first real step rewrites the slot
    for i in range(max_new_tokens):
        if keep_logits:  # a graph replays into the same output buffer
            run.logits.append(logits.clone())
        tokens = choose(logits)
        run.chosen.append(tokens)
        newly = torch.isin(tokens, stops) & (run.stopped < 0)
        run.stopped = torch.where(newly, torch.full_like(run.stopped, i), run.stopped)
        if on_tokens is not None:
            on_tokens(tokens)
        last = i + 1 == max_new_tokens
        check = (i + 1) % interval == 0 or on_tokens is not None
        if last or check and bool((run.stopped >= 0).all()):
            break
        logits = step(tokens, positions)
        positions.add_(1)
        lengths.add_(1)
    return _trim(run, rows, keep_logits)


def forget_workspaces(model: UniMedVLModel) -> None:
    """Drop the model's kept decode workspaces: their CUDA graphs read the weights at the addresses they had
    when captured, so they must go when weights move (a task-residency switch)."""
    _WORKSPACES.pop(model, None)
