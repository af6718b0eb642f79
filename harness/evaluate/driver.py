"""Evaluate many agents on BehaviorBench in one Ray Data job, in parallel, resumably.

The driver validates the data and puts the split's tasks in the object store as it reads them
(`harness.data.io.put_split`). Agents are grouped into actor pools (`harness.evaluate.hf.actor_groups`): agents
that ask for part of a CPU or GPU share their actors, which load each model once and select behaviors through
`harness.agents.selection`. All pools run as one union, so one streaming executor schedules them side by side.
Predictions land in each agent's `PredictionStore` as they arrive: a killed job resumes with the tasks that
have no prediction yet, and an agent whose predictions are final is not run again. An agent whose batches keep
failing is reported with its root cause; the others finish and are recorded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.core.cluster import check_reachable, connect
from harness.core.config import to_dict
from harness.core.errors import ConfigError, HarnessError
from harness.core.storage import Location, location, resolve
from harness.data.io import PREP_CPUS, fingerprint, put_split
from harness.data.taxonomy import Taxonomy, load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.endpoint import BUDGET, EndpointPredictor, Ledger
from harness.evaluate.hf import BATCH_TRIES, AgentPredictor, actor_demand, actor_groups
from harness.evaluate.runs import ResolvedAgent, resolve_agents
from harness.results import leaderboard
from harness.results.metrics import score_agents, slice_name
from harness.results.predictions import ERROR, PredictionStore, readout_summary
from harness.results.run_record import run_record, save_record
from harness.results.tracking import open_run


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


@dataclass
class EvalResult:
    metrics: pd.DataFrame  # tidy leaderboard rows of the agents that finished (harness.results.leaderboard.COLUMNS)
    failures: list[str]  # one line per agent that failed; its traceback is logged beside its predictions

    def raise_failures(self, recorded: str) -> None:
        """HarnessError naming every failed agent, once the others are `recorded` (e.g. the leaderboard path)."""
        if self.failures:
            others = f"; the other agents are recorded in {recorded}" if len(self.metrics) else ""
            raise HarnessError("; ".join(self.failures) + others)


def evaluate(cfg: EvalConfig, progress=None) -> EvalResult:
    """Run every agent that has no final predictions yet and score all of them (with paired comparisons).

    The caller records the metrics (`harness.results.leaderboard.append`); an agent that fails is reported in
    `failures` and the others still finish.
    """
    import ray
    from ray.data.expressions import col

    taxonomy = load_taxonomy(cfg.taxonomy)
    dataset_id = fingerprint(cfg.data)
    agents = resolve_agents(cfg, dataset_id, taxonomy)
    out = location(cfg.output_dir, "output_dir")
    stores = {a.spec.name: PredictionStore(out, a.key) for a in agents}
    connect(cfg.address)
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
            from harness.evaluate.vllm import vllm_pipeline  # imports ray.data.llm, GPU nodes only

            todo = tasks.filter(expr=col("task_id").not_in(sorted(done[agent.spec.name])), num_cpus=PREP_CPUS)
            pipelines.append(vllm_pipeline(todo, agent, cfg))
    ledgers = {}
    for agent in (a for a in agents if a.spec.name in done and a.spec.backend == "endpoint"):
        settings, name = agent.spec.endpoint, agent.spec.name
        ledgers[name] = (
            ray.remote(num_cpus=0)(Ledger)
            .options(max_concurrency=1)
            .remote(settings.requests_per_s, settings.max_requests, settings.max_tokens)
        )
        pipelines.append(
            tasks.map_batches(
                EndpointPredictor,
                fn_constructor_kwargs={
                    "agent": agent,
                    "cfg": cfg,
                    "done": done[name],
                    "ledger": ledgers[name],
                    "responses": stores[name].responses,
                },
                batch_size=cfg.part_size,
                compute=ray.data.ActorPoolStrategy(size=agent.spec.replicas),
                num_cpus=agent.spec.num_cpus,
                resources=agent.spec.resources,
                max_restarts=BATCH_TRIES,
                max_task_retries=BATCH_TRIES,
            )
        )
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
    spent: set[str] = set()  # endpoint agents that stopped when their budget ran out
    if pipelines:
        combined = pipelines[0].union(*pipelines[1:]) if len(pipelines) > 1 else pipelines[0]
        for batch in combined.iter_batches(batch_size=None, batch_format="pandas"):
            for name, rows in batch.groupby("agent"):
                errors = rows[ERROR].fillna("")
                if (errors == BUDGET).any():
                    spent.add(name)
                failed = (errors != "") & (errors != BUDGET)
                if failed.any() and name not in failures:
                    failures[name] = stores[name].write_failure(name, rows.loc[failed, ERROR].iloc[0])
                if (errors == "").any():
                    stores[name].add(rows[errors == ""])
                if progress is not None:
                    progress(name, len(rows), remaining[name])
    usage = {name: ray.get(ledger.usage.remote()) for name, ledger in ledgers.items()}
    for name in sorted(spent - set(failures)):
        settings, kept = next(a for a in agents if a.spec.name == name).spec.endpoint, stores[name].done_ids()
        failures[name] = (
            f"agent {name}: stopped when its budget ran out (endpoint.max_requests {settings.max_requests}, "
            f"max_tokens {settings.max_tokens}); {len(kept)} of {len(planned)} tasks have predictions, kept in "
            f"{stores[name].parts_dir}: raise the budget and re-run to continue"
        )
    finished = [a for a in agents if a.spec.name not in failures]
    for agent in finished:
        if not stores[agent.spec.name].finished:
            stores[agent.spec.name].finalize(planned)
    # Each agent's metrics, and its paired comparisons with every other agent of this job (same tasks).
    frames = {a.spec.name: stores[a.spec.name].read() for a in finished}
    scored = score_agents(frames, samples=cfg.bootstrap)
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
                readout=readout_summary(frames[agent.spec.name]),
                dataset=dataset_id,
                split=cfg.split,
            )
        )
    table = pd.concat(metrics, ignore_index=True) if metrics else pd.DataFrame(columns=leaderboard.COLUMNS)
    for agent in finished:
        record_evaluation(
            cfg, agent, dataset_id, scored[agent.spec.name], stores[agent.spec.name], usage.get(agent.spec.name)
        )
    return EvalResult(table, list(failures.values()))


def record_evaluation(
    cfg: EvalConfig,
    agent: ResolvedAgent,
    dataset_id: str,
    metrics: pd.DataFrame,
    store: PredictionStore,
    usage: dict[str, float] | None = None,
) -> None:
    """Write the agent run's record beside its final predictions (once; an endpoint agent's `endpoint_usage`, what
    this job spent, each time) and track the evaluation: one run per agent run id in experiment "eval", with its
    params, its leaderboard metrics (`<subset>/<slice>/<metric>` and their `.ci_low`/`.ci_high`, and an endpoint's
    `endpoint/<count>`) and the predictions file as an artifact."""
    spec = agent.spec
    if store.record.exists():  # predictions made by an earlier job: its record describes them
        record = json.loads(store.record.read_text())
    else:  # the bootstrap seed is harness.results.metrics.score_agents' default, which evaluate() uses
        record = run_record({"batch_size": spec.batch_size, "part_size": cfg.part_size}, {"bootstrap": 0})
    if usage is not None:
        record["endpoint_usage"] = usage
    if usage is not None or not store.record.exists():
        save_record(store.record, record)
    params = {
        "agent": to_dict(spec),
        "model_path": agent.model_path,
        "design": agent.design.name if agent.design else "",
        "dataset": dataset_id,
        "split": cfg.split,
        "max_tasks": cfg.max_tasks,
        "run_id": agent.run_id,
    }
    settings = cfg.tracking.resolved(cfg.output_dir)
    tracker = open_run(settings, "eval", agent.key, store.tracking, params, record)
    values: dict[str, Any] = {}
    for row in metrics.itertuples():
        name = f"{row.subset}/{slice_name(row.slice_kind, row.slice_value)}/{row.metric}"
        values.update({name: row.value, f"{name}.ci_low": row.ci_low, f"{name}.ci_high": row.ci_high})
    values.update({f"endpoint/{key}": value for key, value in (usage or {}).items()})
    tracker.log_metrics(values, step=0)
    if store.final.local:
        tracker.log_file(Path(store.final.path))
    else:  # the predictions stay in their object store: the run names them
        tracker.set_tags({"predictions": str(store.final)})
    tracker.finish()
