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
from dataclasses import dataclass, field, replace
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
from harness.evaluate.grading import PROACTIVE_COLUMNS, content_metrics, exact_grades, proactive_frame
from harness.evaluate.hf import BATCH_TRIES, AgentPredictor, actor_demand, actor_groups, replicas
from harness.evaluate.judge import EndpointJudge, LocalJudge, agreement, write_agreement
from harness.evaluate.runs import ResolvedAgent, resolve_agents
from harness.results import leaderboard
from harness.results.content import EVIDENCE, NONE
from harness.results.metrics import score_agents, slice_name
from harness.results.predictions import ERROR, PredictionStore, agreement_file, readout_summary
from harness.results.run_record import run_record, save_record
from harness.results.tracking import open_run


def _planned_tasks(cfg: EvalConfig, taxonomy: Taxonomy, out: Location, proactive: list[dict[str, Any]]):
    """The split's tasks (the first `max_tasks` by task_id) in the object store, in parts, and their ids; its
    proactive tasks are added to `proactive` (what grading their answers needs)."""
    import ray.data
    from ray.data.expressions import col

    def keep(row: dict[str, Any]) -> None:
        if row["task_type"] == "proactive":
            proactive.append({key: row[key] for key in PROACTIVE_COLUMNS})

    with out.local_dir() as scratch:  # skipped bad rows are written to `out`
        blocks, ids = put_split(
            resolve(cfg.data),
            cfg.split,
            cfg.part_size,
            taxonomy,
            skip_bad_rows=cfg.skip_bad_rows,
            rejects_path=scratch / "rejects.jsonl",
            on_row=keep,
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
    notes: list[str] = field(default_factory=list)  # lines for people: a judge's agreement with the exact check

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
    proactive: list[dict[str, Any]] = []
    tasks, planned = _planned_tasks(cfg, taxonomy, out, proactive)

    pipelines, remaining, done = [], {}, {}
    actors: dict[str, int] = {}  # the actors each agent that runs now has: its run record says how it ran
    for agent in agents:
        store = stores[agent.spec.name]
        if store.finished:
            continue
        done[agent.spec.name] = store.done_ids()
        remaining[agent.spec.name] = len(planned - done[agent.spec.name])
        if agent.spec.backend == "vllm":
            from harness.evaluate.vllm import vllm_pipeline  # imports ray.data.llm, GPU nodes only

            todo = tasks.filter(expr=col("task_id").not_in(sorted(done[agent.spec.name])), num_cpus=PREP_CPUS)
            actors[agent.spec.name] = agent.spec.replicas or 1
            pipelines.append(vllm_pipeline(todo, agent, cfg, actors[agent.spec.name]))
    ledgers = {}
    for agent in (a for a in agents if a.spec.name in done and a.spec.backend == "endpoint"):
        settings, name = agent.spec.endpoint, agent.spec.name
        actors[name] = agent.spec.replicas or 1
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
                compute=ray.data.ActorPoolStrategy(size=actors[name]),
                num_cpus=agent.spec.num_cpus,
                resources=agent.spec.resources,
                max_restarts=BATCH_TRIES,
                max_task_retries=BATCH_TRIES,
            )
        )
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    groups = actor_groups([a for a in agents if a.spec.name in done and a.spec.backend == "hf"], nodes)
    # Sized from what the cluster holds, not from a snapshot of its free resources: that view lags (Ray Data's own
    # metadata tasks, or the actors of a job that just ended, still count as holding CPUs for a moment), and a pool
    # actor with no CPU free yet simply starts once one frees.
    capacity = ray.cluster_resources()
    for group, count in zip(groups, replicas(groups, capacity), strict=True):
        actors |= {agent.spec.name: count for agent in group}
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
                compute=ray.data.ActorPoolStrategy(size=count),
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
    notes: list[str] = []
    if cfg.content:
        graded = _grades(cfg, finished, frames, stores, proactive_frame(proactive), out, notes)
        content = content_metrics(graded, cfg.bootstrap)
        scored = {name: pd.concat([rows, content.get(name)], ignore_index=True) for name, rows in scored.items()}
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
        name = agent.spec.name
        record_evaluation(cfg, agent, dataset_id, scored[name], stores[name], actors.get(name), usage.get(name))
    return EvalResult(table, list(failures.values()), notes)


def _grades(
    cfg: EvalConfig,
    agents: list[ResolvedAgent],
    frames: dict[str, pd.DataFrame],
    stores: dict[str, PredictionStore],
    tasks: pd.DataFrame,
    out: Location,
    notes: list[str],
) -> dict[str, dict[str, pd.DataFrame]]:
    """Each agent's content grades by grader: the exact check where tasks have evidence and, with a judge, the
    judge's; saved beside its predictions. A judge's agreement with the exact check goes to `notes`."""
    grades = {agent.spec.name: {EVIDENCE: exact_grades(frames[agent.spec.name], tasks)} for agent in agents}
    if cfg.judge is not None:
        judge = resolve_agents(replace(cfg, agents=[cfg.judge], judge=None), "", load_taxonomy(cfg.taxonomy))[0]
        grader = f"judge:{judge.spec.name}"
        judged = _judge(cfg, judge, agents, frames, stores, tasks, grader)
        for name, frame in judged.items():
            grades[name][grader] = frame
        exact = pd.concat([g[EVIDENCE].assign(agent=n) for n, g in grades.items()], ignore_index=True)
        pooled = pd.concat([frame.assign(agent=n) for n, frame in judged.items()], ignore_index=True)
        both = exact.merge(pooled, on=["agent", "task_id"], suffixes=("_exact", "_judge"))
        both = both[both["grade_exact"] != NONE]  # the judge grades interventions; `none` elsewhere is no verdict
        if len(both):
            result = agreement(both["grade_exact"], both["grade_judge"])
            write_agreement(agreement_file(out, judge.spec.name), judge.spec.name, result)
            notes.append(
                f"judge {judge.spec.name}: Cohen's kappa {result['kappa']:.3f} with the exact check on {result['n']} "
                f"interventions ({agreement_file(out, judge.spec.name)})"
            )
    for name, by_grader in grades.items():
        saved = [frame.assign(grader=grader)[["task_id", "grader", "grade"]] for grader, frame in by_grader.items()]
        stores[name].grades.write_parquet(pd.concat(saved, ignore_index=True))
    return grades


def _judge(
    cfg: EvalConfig,
    judge: ResolvedAgent,
    agents: list[ResolvedAgent],
    frames: dict[str, pd.DataFrame],
    stores: dict[str, PredictionStore],
    tasks: pd.DataFrame,
    grader: str,
) -> dict[str, pd.DataFrame]:
    """The judge's grade of each agent's answers on proactive tasks (task_id, case_id, hard, grade): `none` where
    the agent did not intervene, the judge's where it did (grades it gave this agent run before are kept)."""
    import ray

    asked, judged = [], {}
    for agent in agents:
        name = agent.spec.name
        answered = frames[name][frames[name]["answer"].notna()][["task_id", "pred_behavior", "answer"]]
        rows = answered.merge(tasks[["task_id", "case_id", "hard", "messages", "reference"]], on="task_id")
        known = _saved_grades(stores[name], grader)
        rows = rows.assign(
            grade=[
                known.get(t, NONE if b != "proactive" else "")
                for t, b in zip(rows["task_id"], rows["pred_behavior"], strict=True)
            ]
        )
        judged[name] = rows
        asked.append(rows[rows["grade"] == ""].assign(agent=name))
    todo = pd.concat(asked, ignore_index=True)[["agent", "task_id", "messages", "reference", "answer"]]
    if len(todo):
        dataset = ray.data.from_pandas(todo)
        spec = judge.spec
        if spec.backend == "endpoint":
            ledger = ray.remote(num_cpus=0)(Ledger).remote(
                spec.endpoint.requests_per_s, spec.endpoint.max_requests, spec.endpoint.max_tokens
            )
            responses = location(cfg.output_dir, "output_dir").child(f"judge-{spec.name}").child("responses")
            callable_, kwargs = (
                EndpointJudge,
                {"settings": spec.endpoint, "model": spec.model, "ledger": ledger, "responses": responses},
            )
        else:
            callable_ = LocalJudge
            kwargs = {
                "path": judge.model_path,
                "dtype": spec.dtype,
                "trust_remote_code": spec.trust_remote_code,
                "max_prompt_tokens": cfg.max_prompt_tokens,
                "batch_size": spec.batch_size,
            }
        graded = dataset.map_batches(
            callable_,
            fn_constructor_kwargs=kwargs,
            batch_size=cfg.part_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=spec.num_cpus,
            num_gpus=spec.num_gpus,
        ).to_pandas()
        failed = graded[graded["error"] != ""]
        if len(failed):
            raise HarnessError(f"judge {spec.name}: {failed['error'].iloc[0].splitlines()[-1]}")
        new = {(a, t): g for a, t, g in graded[["agent", "task_id", "grade"]].itertuples(index=False)}
        for name, rows in judged.items():
            rows["grade"] = [g or new.get((name, t), "") for t, g in zip(rows["task_id"], rows["grade"], strict=True)]
    return {name: rows[rows["grade"] != ""][["task_id", "case_id", "hard", "grade"]] for name, rows in judged.items()}


def _saved_grades(store: PredictionStore, grader: str) -> dict[str, str]:
    """The grades `grader` gave this agent run before (task_id -> grade)."""
    if not store.grades.exists():
        return {}
    saved = store.grades.read_parquet()
    return dict(saved[saved["grader"] == grader][["task_id", "grade"]].itertuples(index=False))


def record_evaluation(
    cfg: EvalConfig,
    agent: ResolvedAgent,
    dataset_id: str,
    metrics: pd.DataFrame,
    store: PredictionStore,
    actors: int | None,
    usage: dict[str, float] | None = None,
) -> None:
    """Write the agent run's record beside its final predictions (once, with the `actors` this job ran it on; an
    endpoint agent's `endpoint_usage`, what this job spent, each time) and track the evaluation: one run per agent
    run id in experiment "eval", with its params, its leaderboard metrics (`<subset>/<slice>/<metric>` and their
    `.ci_low`/`.ci_high`, and an endpoint's `endpoint/<count>`) and the predictions file as an artifact."""
    spec = agent.spec
    if store.record.exists():  # predictions made by an earlier job: its record describes them
        record = json.loads(store.record.read_text())
    else:  # the bootstrap seed is harness.results.metrics.score_agents' default, which evaluate() uses
        record = run_record({"batch_size": spec.batch_size, "part_size": cfg.part_size}, {"bootstrap": 0})
        record["actors"] = actors
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
