"""Token designs: how a behavior is written into the training target, as data.

A design says which labels exist (`granularity`), how each is spelled (`spelling`: new special
tokens or plain-text tags made of existing tokens), where the behavior vocabulary is introduced
(`placement`: the paper's form puts only the token at the start of the assistant turn; `system`
also describes the tokens in the system prompt) and how new embedding rows start (`init`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.data.taxonomy import Taxonomy

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GRANULARITIES = ("behavior", "task_type", "category")
SPELLINGS = ("special", "text")
PLACEMENTS = ("assistant", "system")
INITS = ("mean", "phrase", "random")
DESIGN_FILE = "token_design.json"


@dataclass(frozen=True)
class TokenDesign:
    granularity: str = "behavior"
    spelling: str = "special"
    placement: str = "assistant"
    init: str = "phrase"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("granularity", GRANULARITIES),
            ("spelling", SPELLINGS),
            ("placement", PLACEMENTS),
            ("init", INITS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"design.{name}: {getattr(self, name)!r} is not one of {list(allowed)}")

    @property
    def name(self) -> str:
        return f"{self.granularity}-{self.spelling}-{self.placement}-{self.init}"

    def token(self, label: str) -> str:
        return f"<behavior:{label}>" if self.spelling == "special" else f"[{label}]"

    def tokens(self, taxonomy: Taxonomy) -> dict[str, str]:
        """Label -> its spelling, for every label of this design's granularity."""
        return {label: self.token(label) for label in taxonomy.labels(self.granularity)}

    def target(self, label: str, answer: str) -> str:
        """The assistant turn to train on: the behavior token first, then the answer."""
        return f"{self.token(label)} {answer}".rstrip()

    def system_note(self, taxonomy: Taxonomy) -> str:
        """Text added to the system prompt when `placement` is `system` (empty otherwise)."""
        if self.placement != "system":
            return ""
        described = "; ".join(
            f"{tok} = {_describe(taxonomy, self.granularity, label)}" for label, tok in self.tokens(taxonomy).items()
        )
        return f"Begin every answer with exactly one behavior token: {described}."

    def parse(self, text: str, taxonomy: Taxonomy) -> str | None:
        """The label whose token opens `text` (after whitespace), or None."""
        text = text.lstrip()
        for label, tok in sorted(self.tokens(taxonomy).items(), key=lambda kv: -len(kv[1])):
            if text.startswith(tok):
                return label
        return None

    def label_token_ids(self, tokenizer: PreTrainedTokenizerBase, taxonomy: Taxonomy) -> list[list[int]]:
        """Token ids of each label's spelling, in `taxonomy.labels(granularity)` order."""
        return [tokenizer(tok, add_special_tokens=False)["input_ids"] for tok in self.tokens(taxonomy).values()]

    def add_to_tokenizer(self, tokenizer: PreTrainedTokenizerBase, taxonomy: Taxonomy) -> None:
        """Add this design's special tokens to `tokenizer` (nothing for text spelling or if present)."""
        if self.spelling != "special":
            return
        new = [t for t in self.tokens(taxonomy).values() if t not in tokenizer.get_vocab()]
        if new:
            tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)

    def apply(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, taxonomy: Taxonomy) -> list[int]:
        """Add this design's tokens to `tokenizer` and `model`; return the ids of the new embedding rows.

        Re-applying to a tokenizer and model that already have the tokens (a checkpoint) adds nothing.
        """
        self.add_to_tokenizer(tokenizer, taxonomy)
        old_rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) <= old_rows:
            return []
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        fresh = list(range(old_rows, len(tokenizer)))
        self._init_rows(tokenizer, model, taxonomy, fresh, old_rows)
        return fresh

    def _init_rows(self, tokenizer, model, taxonomy: Taxonomy, rows: list[int], old_rows: int) -> None:
        import torch

        labels = {tokenizer.convert_tokens_to_ids(tok): label for label, tok in self.tokens(taxonomy).items()}
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
            matrices.append(output.weight)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for weight in matrices:
                base = weight[:old_rows]
                for row in rows:
                    weight[row] = self._initial_row(tokenizer, taxonomy, base, labels[row], generator)

    def _initial_row(self, tokenizer, taxonomy: Taxonomy, base: torch.Tensor, label: str, generator) -> torch.Tensor:
        import torch

        if self.init == "random":
            return torch.randn(base.shape[1], generator=generator).to(base.dtype) * base.float().std().to(base.dtype)
        if self.init == "phrase":
            ids = tokenizer(_describe(taxonomy, self.granularity, label), add_special_tokens=False)["input_ids"]
            ids = [i for i in ids if i < base.shape[0]]
            if ids:
                return base[ids].float().mean(0).to(base.dtype)
        return base.float().mean(0).to(base.dtype)

    def save(self, directory: str | Path) -> None:
        Path(directory, DESIGN_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> TokenDesign | None:
        """The design saved in a model directory (a local path or a storage URI), or None."""
        from harness.core.storage import location

        saved = location(directory, "model").child(DESIGN_FILE)
        return cls(**json.loads(saved.read_text())) if saved.exists() else None


def _describe(taxonomy: Taxonomy, granularity: str, label: str) -> str:
    """A short phrase for a label, used to describe tokens and to initialise their embeddings."""
    behavior = taxonomy.behavior_of_label(granularity, label)
    return f"{label.replace('_', ' ')}: {behavior} behavior"


def design_strings(taxonomy: Taxonomy) -> set[str]:
    """The spelling of every behavior token any special-spelling design can add, at every granularity."""
    return {TokenDesign(granularity=g).token(label) for g in GRANULARITIES for label in taxonomy.labels(g)}
