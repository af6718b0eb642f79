"""Evaluate many agents on BehaviorBench in one Ray Data job, in parallel, resumably.

The driver validates the data and puts the split's tasks in the object store as it reads them
(`harness.bench.io.put_split`). Agents are grouped into actor pools (`actor_groups`): agents that ask for part
of a CPU or GPU share their actors, which load each model once and select behaviors through
`harness.selection`. All pools run as one union, so one streaming executor schedules them side by side.
Predictions land in each agent's `PredictionStore` as they arrive: a killed job resumes with the
tasks that have no prediction yet, and an agent whose predictions are final is not run again.
An agent whose batches keep failing is reported with its root cause; the others finish and are recorded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from harness import leaderboard
from harness.bench.io import PREP_CPUS, fingerprint, put_split
from harness.bench.records import SPLITS
from harness.bench.taxonomy import Taxonomy, load_taxonomy
from harness.cluster import check_reachable
from harness.errors import ConfigError, HarnessError
from harness.metrics import score_agents
from harness.model import DTYPES, ModelSettings, load_model, load_tokenizer, local_copy
from harness.names import name_problem, reference_problem
from harness.predictions import PREDICTION_SCHEMA, PredictionStore
from harness.selection import (
    Mode,
    Selector,
    Strategy,
    chat_template_sha256,
    encode_prompt,
    parse_mode,
    parse_strategy,
)
from harness.store import Location, location, model_path, model_stamp, resolve
from harness.tokens import TokenDesign
from harness.tracking import TrackingSettings, record_evaluation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BATCH_TRIES = 2  # tries of one model batch before its tasks are reported as failed
BACKENDS = ("hf", "vllm")


@dataclass
class AgentSpec:
    name: str
    model: str  # hub id, local path, packaged name (smollm2), run:<run name>, or sweep:<sweep name>:best
    mode: Mode = Mode.ZERO_SHOT
    strategy: Strategy | None = None  # behavior_token, generate or choice; None: the mode's default
    design: TokenDesign | None = None  # behaviorsft: read from the model directory when absent
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor, e.g. {node_b: 1}
    batch_size: int = 16
    dtype: str = "auto"
    trust_remote_code: bool = False
    backend: str = "hf"  # hf: transformers, any strategy; vllm: harness.vllm_backend (GPU; behavior_token, choice)

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:
            raise ValueError(f"name: {problem}")
        problem = reference_problem(self.model)
        if problem:
            raise ValueError(f"model: {self.model}: {problem}")
        self.mode = parse_mode(self.mode, "mode")
        self.strategy = parse_strategy(self.strategy, self.mode, "strategy")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {list(BACKENDS)}")
        if self.backend == "vllm" and self.strategy is Strategy.GENERATE:
            raise ValueError("backend: vllm selects with one token (behavior_token or choice); generate needs hf")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError('backend: vllm is not installed (pip install -e ".[vllm]" on a GPU node)')
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        for key in ("replicas", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {self.num_cpus} and {self.num_gpus}")
        negative = sorted(name for name, amount in self.resources.items() if amount < 0)
        if negative:
            raise ValueError(f"resources: {negative[0]} must be >= 0, got {self.resources[negative[0]]}")


@dataclass
class EvalConfig:
    agents: list[AgentSpec] = field(default_factory=list)
    data: str = "artifacts/data/tasks.jsonl"
    taxonomy: str | None = None
    split: str = "test"
    skip_bad_rows: bool = False
    max_tasks: int | None = None  # the first N tasks of the split by task_id (stable across re-runs)
    output_dir: str = "artifacts/eval"  # a directory, or an object-store prefix such as s3://bucket/eval
    runs_dir: str = "artifacts/runs"
    leaderboard: str = "results/leaderboard.parquet"  # a local file, or an object such as s3://bucket/lb.parquet
    answers: bool = True  # also generate answers for behavior-token agents
    max_new_tokens: int = 32
    max_prompt_tokens: int = 1024
    bootstrap: int = 1000
    part_size: int = 256  # tasks per Ray Data batch and per prediction part: what a killed job keeps
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # its experiment defaults to eval

    def __post_init__(self) -> None:
        names = [a.name for a in self.agents]
        if not names:
            raise ValueError("agents: at least one agent is needed")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"agents: duplicate name(s) {duplicated}")
        for key, low in (("part_size", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 1), ("bootstrap", 0)):
            if getattr(self, key) < low:
                raise ValueError(f"{key}: must be at least {low}, got {getattr(self, key)}")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks: must be at least 1 or null, got {self.max_tasks}")
        if self.split not in SPLITS:
            raise ValueError(f"split: {self.split!r} is not one of {list(SPLITS)}")


def resolve_model(reference: str, runs_dir: str | Path) -> str:
    """A model reference as a loadable path or hub id (see `harness.store.model_path`)."""
    return model_path(reference, runs_dir)


@dataclass(frozen=True)
class ResolvedAgent:
    spec: AgentSpec
    model_path: str
    design: TokenDesign | None
    run_id: str

    @property
    def key(self) -> str:
        return f"{self.spec.name}-{self.run_id}"


def resolve_agents(cfg: EvalConfig, dataset_id: str, taxonomy: Taxonomy) -> list[ResolvedAgent]:
    """Each agent's model path, token design and run id (what its predictions depend on)."""
    taxonomy_id = hashlib.sha256(Path(taxonomy.source).read_bytes()).hexdigest()[:16]
    resolved = []
    for spec in cfg.agents:
        try:
            path = resolve_model(spec.model, cfg.runs_dir)
        except ConfigError as exc:
            raise ConfigError(f"agent {spec.name}: {exc}") from None
        design = spec.design
        if spec.mode is Mode.BEHAVIORSFT and design is None:
            design = TokenDesign.load(path)
            if design is None:
                raise ConfigError(
                    f"agent {spec.name}: mode behaviorsft but {path} has no token_design.json "
                    "and the agent sets no design"
                )
        design = design if spec.mode is Mode.BEHAVIORSFT else None
        # How and where the agent runs is not what it predicts (`resources` is dropped, not nulled: run ids from
        # before that field stay valid).
        agent = {k: v for k, v in asdict(spec).items() if k != "resources"}
        identity = json.dumps(
            [
                {**agent, "design": asdict(design) if design else None, "replicas": None, "num_cpus": None},
                path,
                model_stamp(path),
                dataset_id,
                taxonomy_id,
                cfg.split,
                cfg.max_tasks,
                cfg.answers,
                cfg.max_new_tokens,
                cfg.max_prompt_tokens,
                list(PREDICTION_SCHEMA),  # predictions with other columns are another run's
            ],
            sort_keys=True,
            default=str,
        )
        run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
        resolved.append(ResolvedAgent(spec, path, design, run_id))
    return resolved


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
            settings = ModelSettings(path, spec.dtype, spec.trust_remote_code)
            model = load_model(settings, use_gpu).to("cuda" if use_gpu else "cpu").eval()
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
        produced = ("prompt", "prompt_tokens", "chat_template_sha256", "pred_behavior", "pred_label", "scores")
        out: dict[str, list] = {k: [None] * n for k in (*produced, "answer", "latency_ms", "error")}
        if name in self.failures:
            out["error"] = [self.failures[name]] * n
        else:
            selector = self.selectors[name]
            out["prompt"] = [selector.prompt(list(m)) for m in batch["messages"]]
            prompts = [encode_prompt(selector.tokenizer, text, self.cfg.max_prompt_tokens) for text in out["prompt"]]
            out["prompt_tokens"] = [len(ids) for ids in prompts]
            out["chat_template_sha256"] = [self.template_sha256[name]] * n
            order = sorted(range(n), key=lambda i: len(prompts[i]))  # length buckets: little padding
            for start in range(0, n, spec.batch_size):
                group = order[start : start + spec.batch_size]
                began = time.perf_counter()
                selections, error = self._select(selector, [prompts[i] for i in group])
                latency = (time.perf_counter() - began) * 1000 / len(group)
                for k, i in enumerate(group):
                    out["error"][i], out["latency_ms"][i] = error, latency
                    if selections:
                        chosen = selections[k]
                        out["pred_behavior"][i], out["pred_label"][i] = chosen.behavior, chosen.label
                        out["scores"][i], out["answer"][i] = chosen.scores, chosen.answer
        return {
            **{k: batch[k] for k in ("task_id", "case_id", "category", "task_type", "gold_behavior")},
            "agent": [name] * n,
            "hard": [bool(h) for h in batch["hard"]],
            "strategy": [Strategy(spec.strategy).value] * n,
            **out,
        }


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


def _planned_tasks(cfg: EvalConfig, taxonomy: Taxonomy, out: Location):
    """The split's tasks (the first `max_tasks` by task_id) in the object store, in parts, and their ids."""
    import ray.data
    from ray.data.expressions import col

    with out.local_dir() as scratch:  # skipped bad rows are written to `out`
        blocks, ids = put_split(
            resolve(cfg.data),
            cfg.split,
            cfg.part_size,
            taxonomy,
            skip_bad_rows=cfg.skip_bad_rows,
            rejects_path=scratch / "rejects.jsonl",
        )
    if not ids:
        raise ConfigError(f"{cfg.data}: no tasks in split {cfg.split!r}")
    tasks = ray.data.from_arrow_refs(blocks)
    if cfg.max_tasks and cfg.max_tasks < len(ids):
        ids = sorted(ids)[: cfg.max_tasks]
        tasks = tasks.filter(expr=col("task_id").is_in(ids), num_cpus=PREP_CPUS)
        tasks = tasks.repartition(target_num_rows_per_block=cfg.part_size, strict=True).materialize()
    return tasks, set(ids)


def _write_failure(store: PredictionStore, name: str, error: str) -> str:
    """Save a failed agent's traceback beside its predictions; return the one line to show."""
    log = store.parts_dir.child("error.log")
    log.write_text(error)
    last = next((line for line in reversed(error.strip().splitlines()) if line.strip()), "unknown error")
    return f"agent {name}: {last.strip()} (full traceback: {log})"


@dataclass
class EvalResult:
    metrics: pd.DataFrame  # tidy leaderboard rows of the agents that finished (harness.leaderboard.COLUMNS)
    failures: list[str]  # one line per agent that failed; its traceback is logged beside its predictions

    def raise_failures(self, recorded: str) -> None:
        """HarnessError naming every failed agent, once the others are `recorded` (e.g. the leaderboard path)."""
        if self.failures:
            others = f"; the other agents are recorded in {recorded}" if len(self.metrics) else ""
            raise HarnessError("; ".join(self.failures) + others)


def evaluate(cfg: EvalConfig, progress=None) -> EvalResult:
    """Run every agent that has no final predictions yet and score all of them (with paired comparisons).

    The caller records the metrics (`harness.leaderboard.append`); an agent that fails is reported in
    `failures` and the others still finish.
    """
    import ray
    from ray.data.expressions import col

    taxonomy = load_taxonomy(cfg.taxonomy)
    dataset_id = fingerprint(cfg.data)
    agents = resolve_agents(cfg, dataset_id, taxonomy)
    out = location(cfg.output_dir, "output_dir")
    stores = {a.spec.name: PredictionStore(out, a.key) for a in agents}
    if not ray.is_initialized():
        ray.init()
    models = {f"agent {a.spec.name}: model": a.model_path for a in agents}
    check_reachable({"data": cfg.data, "taxonomy": cfg.taxonomy, **models})
    tasks, planned = _planned_tasks(cfg, taxonomy, out)

    pipelines, remaining, done = [], {}, {}
    for agent in agents:
        store = stores[agent.spec.name]
        if store.finished:
            continue
        done[agent.spec.name] = store.done_ids()
        remaining[agent.spec.name] = len(planned - done[agent.spec.name])
        if agent.spec.backend == "vllm":
            from harness.vllm_backend import vllm_pipeline

            todo = tasks.filter(expr=col("task_id").not_in(sorted(done[agent.spec.name])), num_cpus=PREP_CPUS)
            pipelines.append(vllm_pipeline(todo, agent, cfg))
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    for group in actor_groups([a for a in agents if a.spec.name in done and a.spec.backend == "hf"], nodes):
        demand = actor_demand(group)
        # No Ray Data operator between the materialized tasks and the actors: a task of one could wait forever
        # for CPUs the actors hold.
        pipelines.append(
            tasks.map_batches(
                AgentPredictor,
                fn_constructor_kwargs={
                    "agents": group,
                    "cfg": cfg,
                    "done": {a.spec.name: done[a.spec.name] for a in group},
                },
                batch_size=cfg.part_size,
                compute=ray.data.ActorPoolStrategy(size=group[0].spec.replicas),
                num_cpus=demand.pop("CPU"),
                num_gpus=demand.pop("GPU"),
                resources=demand,
                max_restarts=BATCH_TRIES,  # an actor that dies (e.g. killed for memory) is not retried forever
                max_task_retries=BATCH_TRIES,
            )
        )
    failures: dict[str, str] = {}
    if pipelines:
        combined = pipelines[0].union(*pipelines[1:]) if len(pipelines) > 1 else pipelines[0]
        for batch in combined.iter_batches(batch_size=None, batch_format="pandas"):
            for name, rows in batch.groupby("agent"):
                failed = rows["error"].fillna("") != ""
                if failed.any() and name not in failures:
                    failures[name] = _write_failure(stores[name], name, rows.loc[failed, "error"].iloc[0])
                if (~failed).any():
                    stores[name].add(rows[~failed])
                if progress is not None:
                    progress(name, len(rows), remaining[name])
    finished = [a for a in agents if a.spec.name not in failures]
    for agent in finished:
        if not stores[agent.spec.name].finished:
            stores[agent.spec.name].finalize(planned)
    # Each agent's metrics, and its paired comparisons with every other agent of this job (same tasks).
    scored = score_agents({a.spec.name: stores[a.spec.name].read() for a in finished}, samples=cfg.bootstrap)
    metrics = []
    for agent in finished:
        metrics.append(
            leaderboard.with_metadata(
                scored[agent.spec.name],
                run_id=agent.run_id,
                agent=agent.spec.name,
                model=agent.spec.model,
                mode=agent.spec.mode.value,
                design=agent.design.name if agent.design else "",
                dataset=dataset_id,
                split=cfg.split,
            )
        )
    table = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(columns=leaderboard.COLUMNS)
    for agent in finished:
        record_evaluation(cfg, agent, dataset_id, scored[agent.spec.name], stores[agent.spec.name].final)
    return EvalResult(table, list(failures.values()))
