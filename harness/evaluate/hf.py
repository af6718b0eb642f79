"""The `hf` backend: Ray Data actors that load transformers models and select behaviors through
`harness.agents.selection`. Agents that ask for part of a CPU (or GPU) share actors (`actor_groups`)."""

from __future__ import annotations

import time
import traceback
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from harness.agents.encoding import encode_prompt
from harness.agents.loading import load_model, load_tokenizer
from harness.agents.references import local_copy
from harness.agents.selection import Selector, Strategy, chat_template_sha256
from harness.core.errors import ConfigError
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.grading import needs_answer
from harness.evaluate.runs import ResolvedAgent
from harness.results.predictions import Prediction, prediction_batch, scores_column

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BATCH_TRIES = 2  # tries of one model batch before its tasks are reported as failed


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


Loaded = tuple["PreTrainedModel", "PreTrainedTokenizerBase"]


class AgentPredictor:
    """Ray Data callable class: the models of one group of agents (`actor_groups`), loaded once per process;
    runs every agent of the group on each batch of tasks, skipping the tasks an agent already has (`done`).

    Failures (loading an agent's model, or a model batch after `BATCH_TRIES` tries) come back as rows whose
    `error` holds the traceback, so the driver can report that agent and the others go on.
    """

    def __init__(self, agents: list[ResolvedAgent], cfg: EvalConfig, done: dict[str, set[str]]):
        self.cfg = cfg
        self.agents = {agent.spec.name: agent for agent in agents}
        self.done = done  # the tasks each agent already has predictions for
        self.selectors: dict[str, Selector] = {}
        self.template_sha256: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        loaded: dict[tuple, Loaded] = {}  # prompt-only agents of one model share its copy
        for name, agent in self.agents.items():
            try:
                self.selectors[name] = self._load(agent, loaded)
                self.template_sha256[name] = chat_template_sha256(self.selectors[name].tokenizer)
            except Exception as exc:  # reported per task by __call__, with its traceback
                self.failures[name] = "".join(traceback.format_exception(_root_cause(exc)))

    def _load(self, agent: ResolvedAgent, loaded: dict[tuple, Loaded]) -> Selector:
        import torch

        spec, taxonomy, design = agent.spec, load_taxonomy(self.cfg.taxonomy), agent.design
        key = (agent.model_path, spec.dtype, spec.trust_remote_code, design)
        if key not in loaded:
            use_gpu = spec.num_gpus > 0 and torch.cuda.is_available()
            path = local_copy(agent.model_path)
            tokenizer = load_tokenizer(path, spec.trust_remote_code)
            model = (
                load_model(path, spec.dtype, spec.trust_remote_code, use_gpu).to("cuda" if use_gpu else "cpu").eval()
            )
            if design is not None and design.apply(tokenizer, model, taxonomy):
                raise ConfigError(
                    f"agent {spec.name}: {agent.model_path} lacks the behavior tokens of design {design.name}; "
                    "was it trained with it?"
                )
            loaded[key] = model, tokenizer
        model, tokenizer = loaded[key]
        cfg, strategy = self.cfg, Strategy(spec.strategy)
        return Selector(model, tokenizer, taxonomy, spec.mode, strategy, design, cfg.answers, cfg.max_new_tokens)

    def _select(self, selector: Selector, prompts: list[list[int]]) -> tuple[list, str]:
        """Selections of one model batch, or the last error's traceback after BATCH_TRIES tries (its last line,
        the one the user sees, says so)."""
        for _ in range(BATCH_TRIES):
            try:
                return selector.select(prompts), ""
            except Exception as exc:  # e.g. out of memory; retried, then reported
                error = "".join(traceback.format_exception(exc)).rstrip()
        return [], f"{error} (the batch failed {BATCH_TRIES} times)"

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Every agent's predictions for the tasks of `batch` it has none for yet."""
        outputs = []
        for name in self.agents:
            index = [i for i, task in enumerate(batch["task_id"]) if task not in self.done[name]]
            outputs.append(self._predict(name, {key: [column[i] for i in index] for key, column in batch.items()}))
        return {key: [value for out in outputs for value in out[key]] for key in outputs[0]}

    def _predict(self, name: str, batch: dict[str, list]) -> dict[str, list]:
        """One agent's predictions for its rows of a batch."""
        n, spec = len(batch["task_id"]), self.agents[name].spec
        strategy = Strategy(spec.strategy).value
        if name in self.failures:
            return prediction_batch(batch, name, [Prediction(strategy, error=self.failures[name])] * n)
        selector = self.selectors[name]
        rendered = [selector.prompt(list(m)) for m in batch["messages"]]
        prompts = [encode_prompt(selector.tokenizer, r, self.cfg.max_prompt_tokens) for r in rendered]
        readout = "text" if strategy == Strategy.GENERATE.value else "logprobs"
        seen = {"strategy": strategy, "chat_template_sha256": self.template_sha256[name], "readout": readout}
        predictions = [
            Prediction(**seen, prompt=r.text, prompt_tokens=len(ids)) for r, ids in zip(rendered, prompts, strict=True)
        ]
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # length buckets: little padding
        for start in range(0, n, spec.batch_size):
            group = order[start : start + spec.batch_size]
            began = time.perf_counter()
            selections, error = self._select(selector, [prompts[i] for i in group])
            latency = (time.perf_counter() - began) * 1000 / len(group)
            for k, i in enumerate(group):
                predictions[i] = replace(predictions[i], latency_ms=latency, error=error)
                if selections:
                    chosen = selections[k]
                    predictions[i] = replace(
                        predictions[i],
                        pred_behavior=chosen.behavior,
                        pred_label=chosen.label,
                        scores=scores_column(list(chosen.scores), list(chosen.scores.values()))
                        if chosen.scores
                        else None,
                        answer=chosen.answer,
                    )
        if self.cfg.content:
            self._answer_proactive(selector, batch, predictions, spec.batch_size)
        return prediction_batch(batch, name, predictions)

    def _answer_proactive(
        self, selector: Selector, batch: dict[str, list], predictions: list[Prediction], batch_size: int
    ) -> None:
        """Answers, for their content to be graded, on the proactive tasks where the agent intervened without one (a
        `choice` agent, or a behavior-token agent without `answers`), generated from the prompt without a choice
        question (a behavior-token agent's after the label it chose)."""
        need = [i for i, kind in enumerate(batch["task_type"]) if needs_answer(kind, predictions[i])]
        limit, tokenizer = self.cfg.max_prompt_tokens, selector.tokenizer
        prompts = {i: encode_prompt(tokenizer, selector.answer_prompt(list(batch["messages"][i])), limit) for i in need}
        order = sorted(need, key=lambda i: len(prompts[i]))
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            labels = [predictions[i].pred_label or "" for i in group]
            for i, answer in zip(group, selector.answer([prompts[i] for i in group], labels), strict=True):
                predictions[i] = replace(predictions[i], answer=answer)


def actor_demand(group: list[ResolvedAgent]) -> dict[str, float]:
    """What one actor of a group asks Ray for: its agents' CPUs, GPUs and custom resources added up."""
    demand: dict[str, float] = {}
    for spec in (agent.spec for agent in group):
        for name, amount in {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}.items():
            demand[name] = round(demand.get(name, 0.0) + amount, 4)
    return demand


def _shareable(group: list[ResolvedAgent], nodes: list[dict[str, float]]) -> bool:
    """Whether `group`'s agents fit in one actor: together at most one CPU (GPU agents: one GPU, the device its
    models go on), and their added-up demand within one of `nodes` (each node's resources)."""
    demand = actor_demand(group)
    if demand["GPU" if demand["GPU"] else "CPU"] > 1:
        return False
    return any(all(node.get(name, 0.0) >= amount for name, amount in demand.items() if amount) for node in nodes)


def actor_groups(agents: list[ResolvedAgent], nodes: list[dict[str, float]]) -> list[list[ResolvedAgent]]:
    """Agents (backend hf) grouped to share actors. Agents that ask for part of a CPU (or of a GPU) would share it
    anyway; in one process they import torch and transformers once, and agents of one model share its copy. Agents
    with the same replicas, custom resources and GPU use are grouped in config order while they fit
    (`_shareable`); the others run alone, as before."""
    groups: list[list[ResolvedAgent]] = []
    latest: dict[tuple, list[ResolvedAgent]] = {}
    for agent in agents:
        spec = agent.spec
        key = (spec.replicas, spec.num_gpus > 0, tuple(sorted(spec.resources.items())))
        if key in latest and _shareable([*latest[key], agent], nodes):
            latest[key].append(agent)
        else:
            latest[key] = [agent]
            groups.append(latest[key])
    return groups


def replicas(groups: list[list[ResolvedAgent]], capacity: dict[str, float]) -> list[int]:
    """Each group's actors: what its agents set, else as many as fill the cluster's `capacity` of GPUs (a GPU group)
    or CPUs left by the other groups, shared evenly by the groups that set none (at least one each)."""
    kinds = ["GPU" if actor_demand(group)["GPU"] else "CPU" for group in groups]
    counts: list[int | None] = [group[0].spec.replicas for group in groups]
    for kind in ("GPU", "CPU"):  # GPU groups first: their actors' CPUs are not left for the others
        open_ = [i for i, count in enumerate(counts) if count is None and kinds[i] == kind]
        taken = sum(actor_demand(groups[i])[kind] * count for i, count in enumerate(counts) if count is not None)
        wanted = sum(actor_demand(groups[i])[kind] for i in open_)
        for i in open_:
            counts[i] = max(1, int((capacity.get(kind, 0.0) - taken) // wanted)) if wanted else 1
    return [int(count) for count in counts]
