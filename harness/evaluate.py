"""Evaluate many agents on BehaviorBench in one Ray Data job, in parallel, resumably.

The split is read once (streaming, then materialized in the object store); each agent is an actor
pool (`map_batches` over a callable class) that formats prompts for its mode and selects behaviors;
all agents' pipelines run as one union, so one streaming executor schedules them side by side.
Predictions land as Parquet parts per agent as they arrive: a killed job resumes with the tasks
that have no prediction yet, and an agent whose predictions are complete is not run again.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness import leaderboard
from harness.bench.io import fingerprint, load_dataset
from harness.bench.taxonomy import load_taxonomy
from harness.errors import ConfigError
from harness.files import write_parquet
from harness.metrics import score
from harness.model import ModelSettings, load_model, load_tokenizer, local_or_hub
from harness.prompts import MODES, prompt_text
from harness.scoring import classify_answer, generate_answers, label_scores
from harness.tokens import TokenDesign

PREDICTION_SCHEMA = {
    "task_id": "string",
    "agent": "string",
    "category": "string",
    "task_type": "string",
    "gold_behavior": "string",
    "hard": "bool",
    "pred_behavior": "string",
    "pred_label": "string",
    "scores": "string",  # JSON: label -> log-probability (behavior-token agents)
    "answer": "string",
    "latency_ms": "float64",
}


@dataclass
class AgentSpec:
    name: str
    model: str  # hub id, local path, run:<run name>, or sweep:<sweep name>:best
    mode: str = "zero_shot"
    design: TokenDesign | None = None  # behaviorsft: read from the model directory when absent
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    batch_size: int = 16
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {list(MODES)}")
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"name: {self.name!r} must be letters, digits, '-', '_' or '.'")


@dataclass
class EvalConfig:
    agents: list[AgentSpec] = field(default_factory=list)
    data: str = "artifacts/data/tasks.jsonl"
    taxonomy: str | None = None
    split: str = "test"
    skip_bad_rows: bool = False
    max_tasks: int | None = None
    output_dir: str = "artifacts/eval"
    runs_dir: str = "artifacts/runs"
    leaderboard: str = "results/leaderboard.parquet"
    answers: bool = True  # also generate answers for behavior-token agents
    max_new_tokens: int = 32
    max_prompt_tokens: int = 1024
    bootstrap: int = 1000
    part_size: int = 256  # tasks per Ray Data batch and per prediction part: what a killed job keeps

    def __post_init__(self) -> None:
        names = [a.name for a in self.agents]
        if not names:
            raise ValueError("agents: at least one agent is needed")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"agents: duplicate name(s) {duplicated}")


def resolve_model(reference: str, runs_dir: str | Path) -> str:
    """A model reference as a loadable path or hub id: `run:NAME` is that run's final model and
    `sweep:NAME:best` the best trial of a sweep."""
    runs = Path(runs_dir).resolve()
    if reference.startswith("run:"):
        path = runs / reference[4:] / "final"
        if not (path / "config.json").exists():
            raise ConfigError(f"model {reference}: no finished training run at {path}")
        return str(path)
    if reference.startswith("sweep:"):
        parts = reference.split(":")
        if len(parts) != 3 or parts[2] != "best":
            raise ConfigError(f"model {reference}: expected sweep:<sweep name>:best")
        best = runs / "sweeps" / parts[1] / "best.json"
        if not best.exists():
            raise ConfigError(f"model {reference}: no finished sweep at {best.parent}")
        return json.loads(best.read_text())["final_model"]
    return local_or_hub(reference)


def _model_stamp(path: str) -> str:
    """What identifies a model's weights: file sizes and times of a local directory, or the hub id."""
    directory = Path(path)
    if not directory.is_dir():
        return path
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(directory.iterdir()))


@dataclass(frozen=True)
class ResolvedAgent:
    spec: AgentSpec
    model_path: str
    design: TokenDesign | None
    run_id: str

    @property
    def key(self) -> str:
        return f"{self.spec.name}-{self.run_id}"


def resolve_agents(cfg: EvalConfig, dataset_id: str) -> list[ResolvedAgent]:
    resolved = []
    for spec in cfg.agents:
        path = resolve_model(spec.model, cfg.runs_dir)
        design = spec.design
        if spec.mode == "behaviorsft" and design is None:
            design = TokenDesign.load(path)
            if design is None:
                raise ConfigError(
                    f"agent {spec.name}: mode behaviorsft but {path} has no token_design.json "
                    "and the agent sets no design"
                )
        identity = json.dumps(
            [
                asdict(spec),
                path,
                _model_stamp(path),
                dataset_id,
                cfg.split,
                cfg.max_tasks,
                cfg.answers,
                cfg.max_new_tokens,
                cfg.max_prompt_tokens,
            ],
            sort_keys=True,
            default=str,
        )
        run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
        resolved.append(ResolvedAgent(spec, path, design if spec.mode == "behaviorsft" else None, run_id))
    return resolved


class AgentPredictor:
    """Ray Data callable class: one agent's model; selects behaviors for a batch of tasks."""

    def __init__(self, agent: ResolvedAgent, cfg: EvalConfig):
        import torch

        self.agent, self.cfg = agent, cfg
        self.taxonomy = load_taxonomy(cfg.taxonomy)
        use_gpu = agent.spec.num_gpus > 0 and torch.cuda.is_available()
        self.tokenizer = load_tokenizer(agent.model_path, agent.spec.trust_remote_code)
        settings = ModelSettings(agent.model_path, agent.spec.dtype, agent.spec.trust_remote_code)
        self.model = load_model(settings, use_gpu).to("cuda" if use_gpu else "cpu").eval()
        self.design = agent.design
        if self.design is not None:
            added = self.design.apply(self.tokenizer, self.model, self.taxonomy)
            if added:
                raise ConfigError(
                    f"agent {agent.spec.name}: {agent.model_path} lacks the behavior tokens of "
                    f"design {self.design.name}; was it trained with it?"
                )
            self.labels = self.taxonomy.labels(self.design.granularity)
            self.label_ids = self.design.label_token_ids(self.tokenizer, self.taxonomy)

    def _prompt_ids(self, messages) -> list[int]:
        text = prompt_text(self.tokenizer, list(messages), self.agent.spec.mode, self.design, self.taxonomy)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][-self.cfg.max_prompt_tokens :]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["task_id"])
        prompts = [self._prompt_ids(m) for m in batch["messages"]]
        out: dict[str, list] = {
            k: [None] * n for k in ("pred_behavior", "pred_label", "scores", "answer", "latency_ms")
        }
        order = sorted(range(n), key=lambda i: len(prompts[i]))  # length buckets: little padding
        size = self.agent.spec.batch_size
        for start in range(0, n, size):
            group = order[start : start + size]
            began = time.perf_counter()
            chunk = [prompts[i] for i in group]
            answers = [""] * len(group)
            if self.design is not None:
                scores = label_scores(self.model, chunk, self.label_ids, self.tokenizer.pad_token_id)
                labels = [self.labels[j] for j in scores.argmax(1).tolist()]
                behaviors = [self.taxonomy.behavior_of_label(self.design.granularity, lab) for lab in labels]
                score_json = [json.dumps(dict(zip(self.labels, row, strict=True))) for row in scores.tolist()]
                if self.cfg.answers:
                    answers = generate_answers(self.model, self.tokenizer, chunk, self.cfg.max_new_tokens)
            else:
                answers = generate_answers(self.model, self.tokenizer, chunk, self.cfg.max_new_tokens)
                behaviors = [classify_answer(a) for a in answers]
                labels, score_json = behaviors, ["{}"] * len(group)
            latency = (time.perf_counter() - began) * 1000 / len(group)
            for k, i in enumerate(group):
                out["pred_behavior"][i], out["pred_label"][i] = behaviors[k], labels[k]
                out["scores"][i], out["answer"][i], out["latency_ms"][i] = score_json[k], answers[k], latency
        return {
            "task_id": list(batch["task_id"]),
            "agent": [self.agent.spec.name] * n,
            "category": list(batch["category"]),
            "task_type": list(batch["task_type"]),
            "gold_behavior": list(batch["gold_behavior"]),
            "hard": [bool(h) for h in batch["hard"]],
            **out,
        }


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[list(PREDICTION_SCHEMA)].astype(PREDICTION_SCHEMA)


def _done_ids(parts_dir: Path) -> set[str]:
    if not parts_dir.exists():
        return set()
    return {
        t
        for part in sorted(parts_dir.glob("part-*.parquet"))
        for t in pd.read_parquet(part, columns=["task_id"])["task_id"]
    }


def evaluate(cfg: EvalConfig, progress=None) -> pd.DataFrame:
    """Run every agent that has no complete predictions yet; score all; update the leaderboard.

    Returns the tidy metrics rows written to the leaderboard for this config's agents.
    """
    import ray

    taxonomy = load_taxonomy(cfg.taxonomy)
    dataset_id = fingerprint(cfg.data)
    agents = resolve_agents(cfg, dataset_id)
    out = Path(cfg.output_dir).resolve()
    if not ray.is_initialized():
        ray.init()
    tasks = load_dataset(
        Path(cfg.data).resolve(),
        taxonomy,
        skip_bad_rows=cfg.skip_bad_rows,
        rejects_path=out / "rejects.jsonl",
        clean_dir=out,
    )
    split = cfg.split
    tasks = tasks.filter(lambda row: row["split"] == split)
    if cfg.max_tasks:
        tasks = tasks.limit(cfg.max_tasks)
    tasks = tasks.materialize()
    total = tasks.count()
    if total == 0:
        raise ConfigError(f"{cfg.data}: no tasks in split {cfg.split!r}")
    tasks = tasks.repartition(target_num_rows_per_block=cfg.part_size, strict=True).materialize()

    pipelines, remaining = [], {}
    for agent in agents:
        if (out / f"{agent.key}.parquet").exists():
            continue
        done = _done_ids(out / agent.key)
        todo = tasks if not done else tasks.filter(lambda row, done=frozenset(done): row["task_id"] not in done)
        remaining[agent.spec.name] = total - len(done)
        pipelines.append(
            todo.map_batches(
                AgentPredictor,
                fn_constructor_kwargs={"agent": agent, "cfg": cfg},
                batch_size=cfg.part_size,
                compute=ray.data.ActorPoolStrategy(size=agent.spec.replicas),
                num_cpus=agent.spec.num_cpus,
                num_gpus=agent.spec.num_gpus,
            )
        )
    if pipelines:
        keys = {a.spec.name: a.key for a in agents}
        combined = pipelines[0].union(*pipelines[1:]) if len(pipelines) > 1 else pipelines[0]
        for batch in combined.iter_batches(batch_size=None, batch_format="pandas"):
            for name, rows in batch.groupby("agent"):
                write_parquet(out / keys[name] / f"part-{uuid.uuid4().hex}.parquet", _typed(rows))
                if progress is not None:
                    progress(name, len(rows), remaining[name])
    metrics = []
    for agent in agents:
        final = out / f"{agent.key}.parquet"
        if not final.exists():
            parts = [pd.read_parquet(p) for p in sorted((out / agent.key).glob("part-*.parquet"))]
            predictions = pd.concat(parts, ignore_index=True).drop_duplicates("task_id", keep="first")
            write_parquet(final, _typed(predictions.sort_values("task_id").reset_index(drop=True)))
        rows = score(pd.read_parquet(final), samples=cfg.bootstrap)
        metrics.append(
            leaderboard.with_metadata(
                rows,
                run_id=agent.run_id,
                agent=agent.spec.name,
                model=agent.spec.model,
                mode=agent.spec.mode,
                design=agent.design.name if agent.design else "",
                dataset=dataset_id,
                split=cfg.split,
            )
        )
    table = pd.concat(metrics, ignore_index=True)
    leaderboard.append(cfg.leaderboard, table)
    return table
