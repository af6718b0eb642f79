"""The one place text becomes token ids: control tokens only where the harness or a chat template put them.

A prompt's guarded spans (task text holding a control-token string, see `harness.agents.prompts.Rendered`) are
encoded as plain text, the rest as the tokenizer reads it. A prompt without guarded spans encodes exactly as
`tokenizer(text)` would, so nothing changes for clean data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.agents.prompts import Rendered, control_strings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def control_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids of every control token of `tokenizer` (see `harness.agents.prompts.control_strings`)."""
    return set(tokenizer.convert_tokens_to_ids(sorted(control_strings(tokenizer))))


def encode(tokenizer: PreTrainedTokenizerBase, rendered: Rendered) -> list[int]:
    """Token ids of `rendered`: a control token read inside a guarded span is replaced by the ids of its text."""
    if not rendered.guarded:
        return tokenizer(rendered.text, add_special_tokens=False)["input_ids"]
    if not tokenizer.is_fast:
        raise ValueError("task text holding control-token strings needs a fast tokenizer (one with offsets)")
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    control = control_ids(tokenizer)
    ids: list[int] = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        inside = any(start < high and low < end for low, high in rendered.guarded)
        if token in control and inside:
            ids += tokenizer(rendered.text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids.append(token)
    return ids


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Rendered, max_tokens: int) -> list[int]:
    """Token ids of a rendered prompt; a long prompt loses its oldest tokens (the question is at the end)."""
    return encode(tokenizer, prompt)[-max_tokens:]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, prompt: Rendered, target: Rendered, max_length: int
) -> dict[str, list[int]]:
    """input_ids and labels with the prompt masked to -100; long prompts lose their oldest tokens."""
    target_ids = [*encode(tokenizer, target), tokenizer.eos_token_id]
    target_ids = target_ids[: max_length // 2]
    prompt_ids = encode(tokenizer, prompt)[-(max_length - len(target_ids)) :]
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}
