"""The frozen lower layers of a LoRA run on the top layers only, run once per task and kept.

With LoRA on the top `lora.layers` decoder layers, frozen embeddings (`lora.train_new_tokens: false`) and no dropout
below, what enters the first trainable layer depends on the task alone. `FrozenLayers` computes it the first time
a task comes up (a forward pass of the lower layers without gradients) and keeps it; every later step, and every
later epoch, feeds it to the top layers as `inputs_embeds`, with the lower layers swapped for pass-throughs. The
step is the same computation as the whole model's (`check` compares them on the first batch), at the cost of
the top layers only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def causal_lm(model: Any) -> Any:
    """The causal LM (`lm_head` over a decoder stack `model`) inside a peft model or DeepSpeed's engine."""
    found = model
    for _ in range(6):
        if hasattr(found, "lm_head") and hasattr(getattr(found, "model", None), "layers"):
            return found
        found = next((getattr(found, a) for a in ("module", "model", "base_model") if hasattr(found, a)), None)
    raise ValueError(f"{type(model).__name__}: no causal LM (lm_head over a decoder stack) found")


def answer_loss(hidden: torch.Tensor, labels: torch.Tensor, lm_head: Any, first_weight: float) -> torch.Tensor:
    """Next-token cross-entropy from final hidden states, with logits only at the positions that predict an answer
    token (each answer's first token weighted `first_weight`): `weighted_loss` without the rest of the vocabulary's
    logits."""
    import torch.nn.functional as F

    learned = labels[:, 1:] != -100
    rows, cols = learned.nonzero(as_tuple=True)
    losses = F.cross_entropy(lm_head(hidden[rows, cols]).float(), labels[rows, cols + 1], reduction="none")
    first = (learned.cumsum(1) == 1)[rows, cols]
    weights = 1.0 + first.float() * (first_weight - 1)
    return (losses * weights).sum() / weights.sum()


@cache
def _pass_through() -> type:
    """A module that stands in for a decoder layer and returns the hidden states it is given."""
    import torch

    class PassThrough(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return hidden_states

    return PassThrough


class FrozenLayers:
    """The hidden states entering decoder layer `first` (the first trainable one), per task, computed once."""

    def __init__(self, model: Any, first: int):
        self.causal = causal_lm(model)
        self.stack, self.first = self.causal.model, first
        self.kept: dict[str, torch.Tensor] = {}

    @contextmanager
    def _only(self, lower: bool) -> Iterator[None]:
        """The stack with only its lower layers (and no final norm), or only its upper ones."""
        import torch

        layers, norm = self.stack.layers, self.stack.norm
        keep = [i < self.first if lower else i >= self.first for i in range(len(layers))]
        originals = list(layers)
        try:
            for i in range(len(originals)):
                if not keep[i]:
                    layers[i] = _pass_through()()
            if lower:
                self.stack.norm = torch.nn.Identity()
            yield
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            self.stack.norm = norm

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task_ids: list[str]) -> torch.Tensor:
        """The kept hidden states of a right-padded batch, [batch, length, hidden]; tasks seen for the first time are
        run through the lower layers now."""
        import torch

        new = [i for i, task in enumerate(task_ids) if task not in self.kept]
        if new:
            rows = torch.tensor(new, device=input_ids.device)
            training = self.stack.training
            self.stack.eval()
            with torch.no_grad(), self._only(lower=True):
                out = self.stack(input_ids=input_ids[rows], attention_mask=attention_mask[rows]).last_hidden_state
            self.stack.train(training)
            for k, i in enumerate(new):
                self.kept[task_ids[i]] = out[k, : int(attention_mask[i].sum())].detach()
        width, size = input_ids.shape[1], self.stack.embed_tokens.weight.shape[1]
        batch = torch.zeros(len(task_ids), width, size, dtype=self.kept[task_ids[0]].dtype, device=input_ids.device)
        for i, task in enumerate(task_ids):
            kept = self.kept[task]
            batch[i, : kept.shape[0]] = kept
        return batch

    def loss(self, batch: dict[str, torch.Tensor], task_ids: list[str], first_weight: float) -> torch.Tensor:
        """The answer loss of a batch, through the upper layers from the kept hidden states."""
        hidden = self.hidden(batch["input_ids"], batch["attention_mask"], task_ids)
        with self._only(lower=False):
            final = self.stack(inputs_embeds=hidden, attention_mask=batch["attention_mask"]).last_hidden_state
        return answer_loss(final, batch["labels"], self.causal.lm_head, first_weight)

    def validate(
        self, batch: dict[str, torch.Tensor], task_ids: list[str], label_ids: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A dev batch's answer loss and each row's log-probabilities of `label_ids` at its last prompt position
        (what behavior-token selection scores), from one pass of the upper layers: attention is causal, so the
        prompt's positions are what a prompt-only pass computes."""
        import torch

        hidden = self.hidden(batch["input_ids"], batch["attention_mask"], task_ids)
        with self._only(lower=False):
            final = self.stack(inputs_embeds=hidden, attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"]
        last_prompt = (labels != -100).int().argmax(1) - 1
        rows = torch.arange(len(labels), device=labels.device)
        scores = self.causal.lm_head(final[rows, last_prompt]).float().log_softmax(-1)[:, label_ids]
        return answer_loss(final, labels, self.causal.lm_head, 1.0), scores

    def whole_loss(self, batch: dict[str, torch.Tensor], first_weight: float) -> torch.Tensor:
        """The same loss through every layer, from the tokens: what `loss` must equal."""
        final = self.stack(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return answer_loss(final, batch["labels"], self.causal.lm_head, first_weight)
