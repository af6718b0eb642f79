"""Agent runs: each agent's model, token design and run id, which covers everything its predictions depend on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.agents.references import loadable, model_stamp
from harness.agents.selection import Mode
from harness.agents.tokens import TokenDesign
from harness.core.errors import ConfigError
from harness.data.taxonomy import Taxonomy
from harness.evaluate.config import ENDPOINT_RUNTIME, AgentSpec, EvalConfig
from harness.results.predictions import COLUMNS, agent_key
from harness.train.layout import trained_model


@dataclass(frozen=True)
class ResolvedAgent:
    spec: AgentSpec
    model_path: str
    design: TokenDesign | None
    run_id: str

    @property
    def key(self) -> str:
        return agent_key(self.spec.name, self.run_id)


def resolve_agents(cfg: EvalConfig, dataset_id: str, taxonomy: Taxonomy) -> list[ResolvedAgent]:
    """Each agent's model path, token design and run id (what its predictions depend on)."""
    taxonomy_id = hashlib.sha256(Path(taxonomy.source).read_bytes()).hexdigest()[:16]
    resolved = []
    for spec in cfg.agents:
        try:
            path, design = _model(spec, cfg.runs_dir)
        except ConfigError as exc:
            raise ConfigError(f"agent {spec.name}: {exc}") from None
        design = design if spec.mode is Mode.BEHAVIORSFT else None
        identity = json.dumps(
            [
                {**_predicting(spec), "design": asdict(design) if design else None},
                path,
                model_stamp(path) if spec.endpoint is None else path,
                dataset_id,
                taxonomy_id,
                cfg.split,
                cfg.max_tasks,
                cfg.answers,
                cfg.content,
                cfg.max_new_tokens,
                cfg.max_prompt_tokens,
                list(COLUMNS),  # predictions with other columns are another run's
            ],
            sort_keys=True,
            default=str,
        )
        run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
        resolved.append(ResolvedAgent(spec, path, design, run_id))
    return resolved


def _model(spec: AgentSpec, runs_dir: str) -> tuple[str, TokenDesign | None]:
    """Where an agent's model is (a loadable path or hub id; an endpoint agent's server and model name) and the
    token design it answers with (read from the model directory when the agent sets none)."""
    if spec.endpoint is not None:  # a served BehaviorSFT checkpoint's design is the agent's, else the default
        return f"{spec.endpoint.base_url.rstrip('/')}#{spec.model}", spec.design or TokenDesign()
    path = trained_model(spec.model, runs_dir) or loadable(spec.model, "model")
    if spec.mode is not Mode.BEHAVIORSFT or spec.design is not None:
        return path, spec.design
    design = TokenDesign.load(path)
    if design is None:
        raise ConfigError(f"mode behaviorsft but {path} has no token_design.json and the agent sets no design")
    return path, design


def _predicting(spec: AgentSpec) -> dict[str, Any]:
    """What of an agent's spec its predictions depend on. How and where it runs is left out: its replicas, CPUs and
    custom resources, and an endpoint's pacing, retries, budget and key name (`resources` and an absent `endpoint`
    are dropped, not nulled, so the run ids of agents from before those fields stay valid)."""
    agent = {k: v for k, v in asdict(spec).items() if k != "resources"}
    agent.update(replicas=None, num_cpus=None)
    if spec.endpoint is None:
        del agent["endpoint"]
    else:
        agent["endpoint"] = {k: v for k, v in agent["endpoint"].items() if k not in ENDPOINT_RUNTIME}
    return agent
