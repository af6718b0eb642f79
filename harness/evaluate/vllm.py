"""Optional evaluation backend on vLLM through Ray Data LLM (`ray.data.llm.build_processor`); GPU nodes only.

An agent with `backend: vllm` selects its behavior with ONE generated token: greedy, restricted to the
agent's label tokens (`allowed_token_ids`), returning the top log-probabilities, which hold the chosen label
and every label that ranks among the top `LOGPROBS` tokens of the whole vocabulary. The chosen label is the
best label among them; a label below the top-k is recorded with a null score. Strategies `behavior_token`
and `choice` (single-token labels) are supported; `generate` stays on the `hf` backend. Rows come back in
the prediction schema (`harness.results.predictions`), so the driver stores them and resumes exactly as for `hf`.
Install with `pip install -e ".[vllm]"`; nothing here runs in CPU CI except the pure functions below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from harness.agents.encoding import encode_prompt
from harness.agents.loading import load_tokenizer
from harness.agents.prompts import Rendered
from harness.agents.references import local_copy
from harness.agents.selection import (
    Selection,
    Strategy,
    agent_prompt,
    chat_template_sha256,
    label_behavior,
    scored_labels,
)
from harness.core.errors import ConfigError
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.runs import ResolvedAgent
from harness.results.predictions import TASK_COLUMNS, Prediction, prediction_batch, scores_column

if TYPE_CHECKING:
    import ray.data

LOGPROBS = 20  # log-probabilities returned per task (vLLM's top-k over the vocabulary)


def single_token_ids(agent: str, labels: list[str], label_ids: list[list[int]]) -> list[int]:
    """Each label's one token id; a label spelled with several tokens cannot be read from one generated token."""
    for label, ids in zip(labels, label_ids, strict=True):
        if len(ids) != 1:
            raise ConfigError(
                f"agent {agent}: backend vllm needs single-token labels, but {label!r} is {len(ids)} tokens "
                "(use a design with spelling special, or backend hf)"
            )
    return [ids[0] for ids in label_ids]


def sampling_params(label_ids: list[int], logprobs: int = LOGPROBS) -> dict[str, Any]:
    """vLLM sampling parameters of one selection: one greedy token among the labels, with its top log-probs."""
    return {
        "max_tokens": 1,
        "temperature": 0.0,
        "allowed_token_ids": list(label_ids),
        "logprobs": max(logprobs, len(label_ids)),
    }


def _logprob(value: Any) -> float | None:
    """A log-probability from vLLM's `{logprob, rank, decoded_token}` record (or a bare number)."""
    if value is None:
        return None
    return float(value["logprob"] if isinstance(value, Mapping) else value)


def parse_selection(
    logprobs: list[Mapping[Any, Any]] | None, labels: list[str], label_ids: list[int], behaviors: Mapping[str, str]
) -> Selection:
    """The Selection of one task from the log-probs of its first generated token (token id -> record; ids
    may arrive as strings after a trip through Arrow)."""
    first = logprobs[0] if logprobs else {}
    by_id = {int(token): _logprob(value) for token, value in first.items()}
    scores = {label: by_id.get(token) for label, token in zip(labels, label_ids, strict=True)}
    present = {label: score for label, score in scores.items() if score is not None}
    if not present:
        raise ValueError(f"none of the label tokens {label_ids} is among the returned log-probs")
    label = max(present, key=lambda name: present[name])
    return Selection(behaviors[label], label, scores, "")


class PromptEncoder:
    """Ray Data callable class: a batch of tasks as token-id prompts with their sampling parameters."""

    def __init__(self, agent: ResolvedAgent, cfg: EvalConfig, params: dict[str, Any]):
        self.spec, self.design, self.taxonomy = agent.spec, agent.design, load_taxonomy(cfg.taxonomy)
        self.tokenizer = load_tokenizer(local_copy(agent.model_path), agent.spec.trust_remote_code)
        self.template_sha256 = chat_template_sha256(self.tokenizer)
        self.params, self.max_tokens, self.strategy = params, cfg.max_prompt_tokens, Strategy(agent.spec.strategy)

    def _render(self, messages: list[dict[str, Any]]) -> Rendered:
        return agent_prompt(self.tokenizer, messages, self.spec.mode, self.strategy, self.design, self.taxonomy)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["task_id"])
        rendered = [self._render(list(m)) for m in batch["messages"]]
        tokenized = [encode_prompt(self.tokenizer, r, self.max_tokens) for r in rendered]
        return {
            **{key: list(batch[key]) for key in TASK_COLUMNS},
            "agent": [self.spec.name] * n,
            "strategy": [self.strategy.value] * n,
            "prompt": [r.text for r in rendered],
            "prompt_tokens": [len(ids) for ids in tokenized],
            "chat_template_sha256": [self.template_sha256] * n,
            "tokenized_prompt": tokenized,
            "sampling_params": [self.params] * n,
        }


def prediction_row(
    row: dict[str, Any], labels: list[str], label_ids: list[int], behaviors: Mapping[str, str]
) -> dict[str, Any]:
    """One engine output row as a prediction row (with `error` set when the engine or the parse failed)."""
    error = row.get("__inference_error__") or ""
    prediction = Prediction(
        row["strategy"], row["prompt"], row["prompt_tokens"], row["chat_template_sha256"], readout="logprobs"
    )
    if not error:
        try:
            chosen = parse_selection(row.get("logprobs"), labels, label_ids, behaviors)
        except ValueError as exc:
            error = f"ValueError: {exc}"
        else:
            scores = scores_column(list(chosen.scores), list(chosen.scores.values()))
            prediction = replace(prediction, pred_behavior=chosen.behavior, pred_label=chosen.label, scores=scores)
    batch = prediction_batch(
        {key: [row[key]] for key in TASK_COLUMNS}, row["agent"], [replace(prediction, error=error)]
    )
    return {key: values[0] for key, values in batch.items()}


def vllm_pipeline(tasks: ray.data.Dataset, agent: ResolvedAgent, cfg: EvalConfig, engines: int) -> ray.data.Dataset:
    """The agent's predictions over `tasks` as a Ray Data pipeline: encode prompts, `engines` vLLM actors, parse."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    spec, taxonomy = agent.spec, load_taxonomy(cfg.taxonomy)
    strategy = Strategy(spec.strategy)
    tokenizer = load_tokenizer(local_copy(agent.model_path), spec.trust_remote_code)
    labels, ids = scored_labels(tokenizer, taxonomy, strategy, agent.design)
    label_ids = single_token_ids(spec.name, labels, ids)
    behaviors = {label: label_behavior(taxonomy, strategy, agent.design, label) for label in labels}
    config = vLLMEngineProcessorConfig(
        model_source=agent.model_path,
        engine_kwargs={
            "max_model_len": cfg.max_prompt_tokens + 1,
            "dtype": "bfloat16" if spec.dtype == "bfloat16_if_native" else spec.dtype,  # vLLM runs on GPUs
            "trust_remote_code": spec.trust_remote_code,
        },
        batch_size=spec.batch_size,
        concurrency=engines,
        should_continue_on_error=True,
        chat_template_stage=False,  # prompts arrive rendered and tokenized, exactly as on the hf backend
        tokenize_stage=False,
        detokenize_stage=False,
    )
    encoded = tasks.map_batches(
        PromptEncoder,
        fn_constructor_kwargs={"agent": agent, "cfg": cfg, "params": sampling_params(label_ids)},
        batch_size=cfg.part_size,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1,
    )
    return build_processor(config)(encoded).map(
        prediction_row, fn_kwargs={"labels": labels, "label_ids": label_ids, "behaviors": behaviors}
    )
