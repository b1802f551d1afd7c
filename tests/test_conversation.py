"""Multi-turn chat: the earlier turns are in the context, and one turn is exactly a single answer."""

from __future__ import annotations

import pytest
import torch

from .conftest import PARITY

IMAGE = PARITY / "image448.png"
QUESTION = "What is shown?"


def first_logits(model, messages):
    return model.chat(messages, max_new_tokens=3, output_logits=True).logits


def test_one_turn_is_a_single_answer(tiny_model):
    single = tiny_model.answer(IMAGE, QUESTION, max_new_tokens=6, output_logits=True)
    chat = tiny_model.chat([{"role": "user", "content": QUESTION, "images": [IMAGE]}], max_new_tokens=6,
                           return_dict=True, output_logits=True)
    assert chat.token_ids == single.token_ids
    torch.testing.assert_close(chat.logits, single.logits, rtol=0, atol=0)


def test_earlier_turns_reach_the_answer(tiny_model):
    follow_up = {"role": "user", "content": "And the size?"}
    first = {"role": "user", "content": QUESTION, "images": [IMAGE]}
    with_history = first_logits(tiny_model, [first, {"role": "assistant", "content": "A round lesion."}, follow_up])
    other_answer = first_logits(tiny_model, [first, {"role": "assistant", "content": "Nothing."}, follow_up])
    without_image = first_logits(tiny_model, [{"role": "user", "content": QUESTION},
                                              {"role": "assistant", "content": "A round lesion."}, follow_up])
    alone = first_logits(tiny_model, [follow_up])
    for other in (other_answer, without_image, alone):
        assert not torch.allclose(with_history[0], other[0])


def test_system_turn_is_a_leading_text_block(tiny_model):
    user = {"role": "user", "content": QUESTION, "images": [IMAGE]}
    plain = first_logits(tiny_model, [user])
    system = first_logits(tiny_model, [{"role": "system", "content": "Answer briefly."}, user])
    assert not torch.allclose(plain[0], system[0])


@pytest.mark.parametrize("messages, match", [
    ([], "end with a user message"),
    ([{"role": "assistant", "content": "Hi"}], "end with a user message"),
    ([{"role": "doctor", "content": "Hi"}], "role must be one of"),
    ([{"role": "user", "content": "  "}], "non-empty text"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "images": [IMAGE]},
      {"role": "user", "content": "c"}], "only user messages carry images"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
     "system message may only come first"),
    (["hello"], "must be a dict"),
])
def test_bad_conversations_are_refused(tiny_model, messages, match):
    with pytest.raises(ValueError, match=match):
        tiny_model.chat(messages)


def test_a_conversation_longer_than_the_context_is_refused(tiny_model):
    limit = tiny_model.model.language_model.config.max_position_embeddings
    turns = [{"role": "user", "content": "word " * 1000}, {"role": "assistant", "content": "ok"}] * (limit // 1000)
    with pytest.raises(ValueError, match="more than the model's context"):
        tiny_model.chat([*turns, {"role": "user", "content": "and?"}], max_new_tokens=2)
