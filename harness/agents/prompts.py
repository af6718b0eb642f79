"""Prompts: a task's conversation turned into model input (with a system note or a choice question), and
training targets, each with the spans of task text that hold control-token strings (`Rendered.guarded`).

Task text (message contents, reference answers) is data. A tokenizer given the rendered prompt would read a
control-token string inside it (`<|im_end|>`, `<behavior:proactive>`) as the control token itself, so task text
could close a turn, open a fake assistant turn or plant the behavior token being measured. `harness.agents.encoding`
encodes the guarded spans as plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from harness.agents.tokens import TokenDesign
from harness.data.taxonomy import Taxonomy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The paper's prompt-only baseline: explicit instructions describing when to intervene.
INSTRUCTIONS = (
    "Before answering, check the conversation for problems nobody asked about: missing critical "
    "information (for example an undocumented allergy or kidney function), data that conflict, an "
    "order or value that looks like an error, a safety risk such as an allergy or interaction, or an "
    "instruction that could mean more than one thing. If you find one, start your answer by flagging "
    "it or asking to clarify. If nothing is wrong, do not intervene: just answer what was asked."
)


@dataclass(frozen=True)
class Rendered:
    """Text for a model, and the spans `(start, end)` of task text in it that hold a control-token string: only
    those need encoding as plain text (empty: the text encodes as a tokenizer reads it)."""

    text: str
    guarded: tuple[tuple[int, int], ...] = ()


@cache
def _control_pattern(tokenizer: PreTrainedTokenizerBase, size: int) -> re.Pattern[str] | None:
    """The control strings of `tokenizer` as one pattern (`size`, its vocabulary's, changes when tokens are added)."""
    strings = sorted(control_strings(tokenizer), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def control_strings(tokenizer: PreTrainedTokenizerBase) -> set[str]:
    """Every string this tokenizer reads as a control token: its special tokens, those a design added included."""
    special = {str(t) for t in tokenizer.all_special_tokens}
    return special | {str(t) for t in tokenizer.added_tokens_decoder.values() if t.special}


def holds_control(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    pattern = _control_pattern(tokenizer, len(tokenizer))
    return pattern is not None and pattern.search(text) is not None


def conversation(messages: list[dict[str, Any]], extra_system: str = "") -> list[dict[str, str]]:
    """The task's turns with consecutive same-role turns merged (some chat templates require
    alternation) and `extra_system` appended to the system prompt."""
    merged: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if merged and merged[-1]["role"] == role:
            merged[-1] = {"role": role, "content": merged[-1]["content"] + "\n" + content}
        else:
            merged.append({"role": role, "content": content})
    if extra_system:
        if merged and merged[0]["role"] == "system":
            merged[0] = {"role": "system", "content": merged[0]["content"] + "\n" + extra_system}
        else:
            merged.insert(0, {"role": "system", "content": extra_system})
    return merged


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


MARK = "\ue000{}\ue001"  # private-use characters around a message's index: where its content lands
MARKS = re.compile("\ue000(\\d+)\ue001")


def prompt_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], system_note: str = "", question: str = ""
) -> Rendered:
    """The chat-formatted prompt of a task: `system_note` joins the system prompt and `question` (a choice
    prompt) is asked at the end of the last user turn. Task messages holding a control-token string are
    located in the text by rendering the conversation once more with a mark in place of each content."""
    extra = [{"role": "user", "content": question}] if question else []
    text = _render(tokenizer, conversation([*messages, *extra], system_note))
    risky = [i for i, m in enumerate(messages) if holds_control(tokenizer, m["content"])]
    if not risky:
        return Rendered(text)
    marked = [{**m, "content": MARK.format(i)} for i, m in enumerate(messages)]
    pieces = MARKS.split(_render(tokenizer, conversation([*marked, *extra], system_note)))
    for strip in (False, True):  # some templates trim message text
        rebuilt, spans = "", []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                rebuilt += piece
                continue
            content = messages[int(piece)]["content"]
            content = content.strip() if strip else content
            if int(piece) in risky:
                spans.append((len(rebuilt), len(rebuilt) + len(content)))
            rebuilt += content
        if rebuilt == text:
            return Rendered(text, tuple(spans))
    raise ValueError(
        "the chat template rewrites message text, so task text holding a control-token string cannot be told "
        "apart from the template's own (`harness data validate --model` lists such tasks)"
    )


def choice_question(taxonomy: Taxonomy) -> tuple[str, dict[str, str]]:
    """The multiple-choice question of prompt-only agents and each behavior's option letter.

    One option per behavior of the taxonomy, described by the taxonomy, lettered A, B, ...
    """
    letters = {behavior: chr(ord("A") + i) for i, behavior in enumerate(taxonomy.behaviors)}
    options = " ".join(f"({letters[b]}) {taxonomy.behavior_descriptions.get(b, b)}" for b in taxonomy.behaviors)
    question = (
        "Before you reply, choose how to respond to the latest turn. "
        f"{options} Reply with the letter of your choice only."
    )
    return question, letters


def target_text(row: dict[str, Any], design: TokenDesign | None, taxonomy: Taxonomy) -> str:
    """What the model learns to answer: the reference, led by the behavior token when there is a design
    (BehaviorSFT); the reference alone for standard SFT."""
    if design is None:
        return row["reference"]
    label = taxonomy.label_of(design.granularity, row["category"], row["gold_behavior"])
    return design.target(label, row["reference"])


def target(
    tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], design: TokenDesign | None, taxonomy: Taxonomy
) -> Rendered:
    """`target_text`, with the reference guarded when it holds a control-token string (the behavior token that
    leads it is the design's own)."""
    text = target_text(row, design, taxonomy)
    reference = row["reference"]
    if not holds_control(tokenizer, reference):
        return Rendered(text)
    return Rendered(text, ((len(text) - len(reference), len(text)),))
