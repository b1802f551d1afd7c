"""The chat panel's conversation: every question (with the slice it was asked about) and every answer, sent
whole to the model with each new question, so that a follow-up ("and on the left?") is read in context.

It is kept as JSON in the module's parameter node (setting ``conversation``), so it is saved with the scene
and comes back on load. A question's slice is kept as (volume node ID, slice index), not as pixels: the
scene file stays small and the image is read again from the volume, as the user sees it, when sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ChatTurn", "Conversation"]


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "user", "assistant", or "note" (shown in the panel, never sent to the model)
    text: str
    volume_id: str | None = None  # user turns: the volume and slice the question is about
    slice_index: int | None = None


class Conversation:
    def __init__(self, turns: list[ChatTurn] | None = None):
        self.turns = list(turns or [])

    @classmethod
    def from_json(cls, text: str | None) -> Conversation:
        """A conversation saved by ``to_json``; empty for an empty or unset setting."""
        if not text or not text.strip():
            return cls()
        try:
            return cls([ChatTurn(**turn) for turn in json.loads(text)])
        except (TypeError, ValueError) as err:
            raise ValueError(f"the saved conversation cannot be read ({err}); clear it to start again") from None

    def to_json(self) -> str:
        return json.dumps([asdict(t) for t in self.turns])

    def ask(self, question: str, volume_id: str, slice_index: int) -> None:
        if not question.strip():
            raise ValueError("the question is empty")
        if self.turns and self.turns[-1].role == "user":
            raise ValueError("the last question has no answer yet")
        self.turns.append(ChatTurn("user", question.strip(), volume_id, int(slice_index)))

    def answer(self, text: str) -> None:
        self.turns.append(ChatTurn("assistant", text))

    def note(self, title: str, text: str) -> None:
        """Keep a panel entry that is not part of the chat (a draft report, an edit's explanation): shown in
        the transcript, saved with the scene, never sent to the model."""
        self.turns.append(ChatTurn("note", f"{title}:\n{text}"))

    def drop_unanswered(self) -> None:
        """Forget a question whose answer failed, so that the next question is not sent after it."""
        if self.turns and self.turns[-1].role == "user":
            self.turns.pop()

    def messages(self, scene, slice_image: Callable[[object, int], np.ndarray]) -> list[dict]:
        """The turns as ``UniMedVL.chat`` messages, each question with its slice read from ``scene``."""
        out = []
        for n, turn in enumerate(t for t in self.turns if t.role != "note"):
            message = {"role": turn.role, "content": turn.text}
            if turn.role == "user" and turn.volume_id is not None:
                volume = scene.GetNodeByID(turn.volume_id)
                if volume is None:
                    raise ValueError(f"the volume of question {n // 2 + 1} is no longer in the scene; "
                                     "clear the conversation to start a new one")
                message["images"] = [slice_image(volume, turn.slice_index)]
            out.append(message)
        return out

    def transcript(self, notice: str | None = None) -> str:
        """The chat panel's text; the demonstration model's notice once, after the first answer."""
        lines, pending_notice = [], notice
        for turn in self.turns:
            if turn.role == "user":
                lines.append(f"You (slice {turn.slice_index}): {turn.text}")
                continue
            if turn.role == "note":
                lines.append(f"\n{turn.text}\n")
                continue
            lines.append(f"UniMedVL: {turn.text}")
            if pending_notice:
                lines.append(f"[{pending_notice}]")
                pending_notice = None
        return "\n".join(lines)
