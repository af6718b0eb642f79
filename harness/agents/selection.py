"""How an agent picks its behavior: the one place that turns a model's output into a behavior.

Training's dev metrics, sweeps (whose objective is that dev metric) and evaluation all select through
`Selector`, so the number a sweep optimises is computed exactly as the leaderboard's. Three strategies:

- `behavior_token`: the arg-max over the design's behavior tokens at the first answer position (BehaviorSFT);
- `generate`: a greedy answer, read by its leading behavior token when the agent has a design, else by the
  documented answer rule (`harness.scoring.classify_answer`);
- `choice`: a multiple-choice question (one lettered option per behavior) appended to the conversation, the
  options scored by log-likelihood, as lm-evaluation-harness scores `multiple_choice` (prompt-only agents).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

from harness.agents.prompts import INSTRUCTIONS, Rendered, choice_question, prompt_text
from harness.agents.scoring import classify_answer, generate_answers, label_scores
from harness.agents.tokens import TokenDesign
from harness.data.taxonomy import Taxonomy

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class Mode(str, Enum):
    """What an agent is: a prompt-only baseline or a fine-tuned model."""

    ZERO_SHOT = "zero_shot"
    INSTRUCTED = "instructed"  # the paper's prompt-only baseline: explicit instructions on when to intervene
    SFT = "sft"
    BEHAVIORSFT = "behaviorsft"


class Strategy(str, Enum):
    """How an agent's behavior is read from its model."""

    BEHAVIOR_TOKEN = "behavior_token"
    GENERATE = "generate"
    CHOICE = "choice"


DEFAULT_STRATEGY = {
    Mode.ZERO_SHOT: Strategy.CHOICE,
    Mode.INSTRUCTED: Strategy.CHOICE,
    Mode.SFT: Strategy.GENERATE,
    Mode.BEHAVIORSFT: Strategy.BEHAVIOR_TOKEN,
}


def parse_mode(value: Mode | str, where: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not one of {[m.value for m in Mode]}") from None


def parse_strategy(value: Strategy | str | None, mode: Mode, where: str) -> Strategy:
    """The strategy named (or the mode's default); `behavior_token` needs a BehaviorSFT agent."""
    if value is None:
        return DEFAULT_STRATEGY[mode]
    try:
        strategy = Strategy(value)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not one of {[s.value for s in Strategy]}") from None
    if strategy is Strategy.BEHAVIOR_TOKEN and mode is not Mode.BEHAVIORSFT:
        raise ValueError(f"{where}: behavior_token needs mode behaviorsft (a model trained with behavior tokens)")
    return strategy


def agent_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    mode: Mode,
    strategy: Strategy,
    design: TokenDesign | None,
    taxonomy: Taxonomy,
) -> Rendered:
    """The rendered prompt an agent of `mode` answers with `strategy`."""
    return prompt_text(tokenizer, messages, *framing(mode, strategy, design, taxonomy))


def framing(mode: Mode, strategy: Strategy, design: TokenDesign | None, taxonomy: Taxonomy) -> tuple[str, str]:
    """What the harness adds to a task's conversation for an agent: a system note (the instructions, or a design's
    description of its tokens) and a closing question (the `choice` prompt); "" where there is none."""
    note = ""
    if mode is Mode.INSTRUCTED:
        note = INSTRUCTIONS
    elif mode is Mode.BEHAVIORSFT and design is not None:
        note = design.system_note(taxonomy)
    return note, choice_question(taxonomy)[0] if strategy is Strategy.CHOICE else ""


def chat_template_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the tokenizer's chat template, the one that rendered its prompts ("" without one)."""
    template = tokenizer.chat_template
    if not template:
        return ""
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def scored_labels(
    tokenizer: PreTrainedTokenizerBase, taxonomy: Taxonomy, strategy: Strategy, design: TokenDesign | None
) -> tuple[list[str], list[list[int]]]:
    """The labels a `behavior_token` or `choice` agent scores, and each label's token ids."""
    if strategy is Strategy.BEHAVIOR_TOKEN:
        if design is None:
            raise ValueError("strategy behavior_token needs a token design")
        return list(taxonomy.labels(design.granularity)), design.label_token_ids(tokenizer, taxonomy)
    letters = choice_question(taxonomy)[1]
    return list(letters), [tokenizer(letters[b], add_special_tokens=False)["input_ids"] for b in letters]


def label_behavior(taxonomy: Taxonomy, strategy: Strategy, design: TokenDesign | None, label: str) -> str:
    """The behavior a scored label stands for (choice options are behaviors)."""
    if strategy is Strategy.BEHAVIOR_TOKEN:
        assert design is not None
        return taxonomy.behavior_of_label(design.granularity, label)
    return label


def read_answer(answer: str, design: TokenDesign | None, taxonomy: Taxonomy) -> tuple[str, str]:
    """(behavior, label) of a generated answer: its leading behavior token (with a design), else the answer rule."""
    if design is not None:
        label = design.parse(answer, taxonomy)
        if label is not None:
            return taxonomy.behavior_of_label(design.granularity, label), label
    behavior = classify_answer(answer)
    return behavior, behavior


LETTER = re.compile(r"\s*\(?([A-Z])\)?(?![A-Za-z])")


def read_choice(answer: str, letters: dict[str, str]) -> str | None:
    """The behavior whose option letter opens `answer` (`A`, `(A)`, `A.`, `A: ...`), else None: read strictly, so
    `Answer ...` is no `A`."""
    match = LETTER.match(answer)
    chosen = {letter: behavior for behavior, letter in letters.items()}
    return chosen.get(match.group(1)) if match else None


@dataclass(frozen=True)
class Selection:
    behavior: str  # the behavior chosen
    label: str  # what was chosen at the strategy's granularity (behavior token label, option's behavior)
    scores: dict[str, float | None]  # label -> log-probability (empty for `generate`)
    answer: str  # the greedy answer ("" when not generated: `choice`, or answers turned off)


class Selector:
    """One agent's behavior selection over a loaded model and tokenizer."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        taxonomy: Taxonomy,
        mode: Mode,
        strategy: Strategy,
        design: TokenDesign | None = None,
        answers: bool = False,
        max_new_tokens: int = 32,
    ):
        self.model, self.tokenizer, self.taxonomy = model, tokenizer, taxonomy
        self.mode, self.strategy = mode, strategy
        self.design = design if mode is Mode.BEHAVIORSFT else None
        # A choice prompt asks for a letter, so `choice` agents generate no answer.
        self.answers = strategy is Strategy.GENERATE or (answers and strategy is Strategy.BEHAVIOR_TOKEN)
        self.max_new_tokens = max_new_tokens
        if strategy is not Strategy.GENERATE:
            self.labels, self.label_ids = scored_labels(tokenizer, taxonomy, strategy, self.design)

    def prompt(self, messages: list[dict[str, Any]]) -> Rendered:
        return agent_prompt(self.tokenizer, messages, self.mode, self.strategy, self.design, self.taxonomy)

    def answer_prompt(self, messages: list[dict[str, Any]]) -> Rendered:
        """The prompt an answer is generated from: the selection prompt without a `choice` question."""
        strategy = Strategy.GENERATE if self.strategy is Strategy.CHOICE else self.strategy
        return agent_prompt(self.tokenizer, messages, self.mode, strategy, self.design, self.taxonomy)

    def answer(self, prompts: list[list[int]], labels: list[str] | None = None) -> list[str]:
        """Greedy answers of encoded answer prompts (one model batch). A `behavior_token` agent answers after the
        label it chose (`labels`), as it was trained to: behavior first, then the answer, which opens with the
        label's token. Left to generate the token itself, a model whose new tokens were not trained spells it in
        ordinary tokens and the answer that follows drifts."""
        if self.strategy is not Strategy.BEHAVIOR_TOKEN or labels is None:
            return generate_answers(self.model, self.tokenizer, prompts, self.max_new_tokens)
        ids = dict(zip(self.labels, self.label_ids, strict=True))
        prompts = [prompt + ids[label] for prompt, label in zip(prompts, labels, strict=True)]
        answers = generate_answers(self.model, self.tokenizer, prompts, self.max_new_tokens)
        return [self.tokenizer.decode(ids[label]) + a for label, a in zip(labels, answers, strict=True)]

    def select(self, prompts: list[list[int]]) -> list[Selection]:
        """The behavior of each encoded prompt (one model batch: the caller bounds its size)."""
        if self.strategy is Strategy.GENERATE:
            answers = generate_answers(self.model, self.tokenizer, prompts, self.max_new_tokens)
            return [Selection(*read_answer(a, self.design, self.taxonomy), {}, a) for a in answers]
        scores = label_scores(self.model, prompts, self.label_ids, self.tokenizer.pad_token_id)
        chosen = [self.labels[j] for j in scores.argmax(1).tolist()]
        answers = self.answer(prompts, chosen) if self.answers else [""] * len(prompts)
        behavior = {label: label_behavior(self.taxonomy, self.strategy, self.design, label) for label in self.labels}
        return [
            Selection(behavior[label], label, dict(zip(self.labels, row, strict=True)), answer)
            for label, row, answer in zip(chosen, scores.tolist(), answers, strict=True)
        ]
