"""Qwen2-style tokenizer: the special tokens the model uses, loading, and training a small vocabulary.

The released model uses the Qwen2.5 tokenizer; small models of ours use a byte-level BPE trained on
their own corpus with the same special tokens and the same pre-tokenizer, so one code path serves both.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported when a tokenizer is loaded or trained, not with this module
    from transformers import PreTrainedTokenizerBase

__all__ = ["IM_START", "IM_END", "VISION_START", "VISION_END", "END_OF_TEXT", "QWEN2_SPECIAL_TOKENS", "SpecialTokenIds",
           "load_tokenizer", "train_tokenizer", "make_tokenizer_config_portable", "TokenizerError"]

# Spec 4.1: every text block is <|im_start|> ... <|im_end|>; images sit between the vision markers.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
END_OF_TEXT = "<|endoftext|>"

# The Qwen2 added-token list, in id order after the base vocabulary.
QWEN2_SPECIAL_TOKENS = [
    END_OF_TEXT, IM_START, IM_END, "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", VISION_START, VISION_END, "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2's pre-tokenizer split pattern.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class TokenizerError(ValueError):
    """The tokenizer files are missing or lack a token the model needs."""


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the four tokens the layout uses: ``<|im_start|>`` opens every text block and starts decoding,
    ``<|im_end|>`` closes a text block and stops decoding; images sit between the vision markers."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokenIds":
        # Read ids directly: under transformers 5 the reference's add_special_tokens helper miscounts
        # (docs/token-layout.md#special-tokens), and resizing embeddings from that count would be wrong.
        ids = {}
        for name, token in (("im_start", IM_START), ("im_end", IM_END), ("vision_start", VISION_START),
                            ("vision_end", VISION_END)):
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise TokenizerError(f"tokenizer has no {token} token")
            ids[name] = int(tid)
        return cls(**ids)

    def all(self) -> tuple[int, ...]:
        return self.im_start, self.im_end, self.vision_start, self.vision_end


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise TokenizerError(f"no tokenizer files (tokenizer.json or vocab.json + merges.txt) in {path}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises several types for broken files
        raise TokenizerError(f"cannot load the tokenizer in {path}: {err}") from err


def train_tokenizer(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE with the Qwen2 pre-tokenizer and special tokens; save it in ``out_dir``.

    Writes ``tokenizer.json``, ``tokenizer_config.json``, ``vocab.json`` and ``merges.txt`` (the files the
    reference's slow ``Qwen2Tokenizer`` reads as well).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    base = max(vocab_size - len(QWEN2_SPECIAL_TOKENS), 256 + 1)
    trainer = trainers.BpeTrainer(vocab_size=base, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens(QWEN2_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=END_OF_TEXT, bos_token=None, unk_token=None,
        additional_special_tokens=QWEN2_SPECIAL_TOKENS[1:], clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # vocab.json + merges.txt for slow-tokenizer readers; tokenizer_config names the Qwen2 class.
    model = json.loads(tok.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(tokenizer_class="Qwen2Tokenizer", add_bos_token=False, add_prefix_space=False, errors="replace",
               split_special_tokens=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    make_tokenizer_config_portable(out_dir)
    return load_tokenizer(out_dir)


def make_tokenizer_config_portable(folder: str | Path) -> None:
    """Rewrite a transformers-5 ``tokenizer_config.json`` in ``folder`` in the form transformers 4 reads too
    (the published implementation pins 4.49, whose slow ``Qwen2Tokenizer`` fails on a list of
    ``extra_special_tokens`` and takes the added tokens' ids from ``added_tokens_decoder``;
    docs/checkpoint.md#tokenizer-files). Transformers 5 reads the result to the same ids. A config already in
    that form is left as it is."""
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if not isinstance(cfg.get("extra_special_tokens"), list):
        return
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens")
    cfg.pop("backend", None)  # a transformers-5 field
    added = json.loads((Path(folder) / "tokenizer.json").read_text())["added_tokens"]
    cfg["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2, ensure_ascii=False))
