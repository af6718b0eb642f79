"""Model primitives of behavior selection: label log-probabilities, greedy answers, and the answer rule.

torch is imported where a model runs: an evaluation's driver imports this module but runs no model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The documented rule for agents without behavior tokens: an answer is proactive when it opens by
# flagging, warning, reconciling or asking to clarify (checked in its first sentence or two).
PROACTIVE_CUES = re.compile(
    r"\b(before (we|ordering|you|going)|flag|caution|warn|concern|missing|not documented|conflict|"
    r"reconcile|disagree|clarify|which .{0,60} mean|check the dose|looks like an error|error|allergic|"
    r"allergy history|please confirm)\b",
    re.IGNORECASE,
)


def classify_answer(text: str) -> str:
    """`proactive` if the opening of `text` intervenes (PROACTIVE_CUES), else `reactive`."""
    opening = " ".join(re.split(r"(?<=[.!?])\s+", text.strip())[:2])
    return "proactive" if PROACTIVE_CUES.search(opening) else "reactive"


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for a left-padded batch."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def label_scores(
    model: PreTrainedModel, prompts: list[list[int]], label_ids: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Log-probability of each label's tokens right after each prompt: a [batch, labels] tensor.

    Single-token labels (special behavior tokens, option letters) take one forward pass that computes the
    LM head at the first answer position only. Multi-token labels (plain-text tags) take one pass per label.
    """
    import torch

    with torch.no_grad():
        device = _device(model)
        if all(len(ids) == 1 for ids in label_ids):
            ids, mask, positions = (t.to(device) for t in left_pad(prompts, pad_id))
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
            return out.logits[:, -1, :].float().log_softmax(-1)[:, [ids[0] for ids in label_ids]].cpu()
        columns = []
        for label in label_ids:
            ids, mask, positions = (t.to(device) for t in left_pad([p + label for p in prompts], pad_id))
            logprobs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().log_softmax(-1)
            n = len(label)
            target = torch.tensor(label, device=device)
            picked = logprobs[:, -n - 1 : -1, :].gather(-1, target.expand(len(prompts), n).unsqueeze(-1))
            columns.append(picked.squeeze(-1).sum(-1).cpu())
        return torch.stack(columns, dim=1)


def generate_answers(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy answers (special tokens kept, so a behavior token stays visible)."""
    import torch

    with torch.no_grad():
        ids, mask, _ = (t.to(_device(model)) for t in left_pad(prompts, tokenizer.pad_token_id))
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=False)
        return [_strip_specials(t, tokenizer) for t in texts]


def _strip_specials(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The answer up to the end-of-turn token, without padding."""
    if tokenizer.eos_token:
        text = text.split(tokenizer.eos_token)[0]
    if tokenizer.pad_token:
        text = text.replace(tokenizer.pad_token, "")
    return text.strip()
