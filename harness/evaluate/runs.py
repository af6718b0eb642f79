"""Agent runs: each agent's model, token design and run id, which covers everything its predictions depend on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.agents.references import loadable, model_stamp
from harness.agents.selection import Mode
from harness.agents.tokens import TokenDesign
from harness.core.errors import ConfigError
from harness.data.taxonomy import Taxonomy
from harness.evaluate.config import AgentSpec, EvalConfig
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
            path = trained_model(spec.model, cfg.runs_dir) or loadable(spec.model, "model")
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
                list(COLUMNS),  # predictions with other columns are another run's
            ],
            sort_keys=True,
            default=str,
        )
        run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
        resolved.append(ResolvedAgent(spec, path, design, run_id))
    return resolved
