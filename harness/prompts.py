"""Prompts: a task's conversation turned into model input (with a system note or a choice question), and
training targets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from harness.bench.taxonomy import Taxonomy
from harness.tokens import TokenDesign

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


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The chat-formatted prompt, ending where the assistant's answer starts."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prompt_text(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], system_note: str = "", question: str = ""
) -> str:
    """The chat-formatted prompt of a task: `system_note` joins the system prompt and `question` (a choice
    prompt) is asked at the end of the last user turn."""
    turns = list(messages) + ([{"role": "user", "content": question}] if question else [])
    return render_prompt(tokenizer, conversation(turns, system_note))


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


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, max_length: int
) -> dict[str, list[int]]:
    """input_ids and labels with the prompt masked to -100; long prompts lose their oldest tokens."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    target_ids = target_ids[: max_length // 2]
    prompt_ids = prompt_ids[-(max_length - len(target_ids)) :]
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}
