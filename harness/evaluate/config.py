"""The evaluation config: the agents to evaluate, the data and split, and where results go."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from typing import Any

from harness.agents.loading import DTYPES
from harness.agents.references import reference_problem
from harness.agents.selection import Mode, Strategy, parse_mode, parse_strategy
from harness.agents.tokens import TokenDesign
from harness.core.config import check_range
from harness.core.names import name_problem
from harness.data.records import SPLITS
from harness.results.tracking import TrackingSettings

BACKENDS = ("hf", "vllm", "endpoint")
READOUTS = ("auto", "logprobs", "text")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class EndpointSettings:
    """An OpenAI-compatible chat-completions server (a hosted API, vLLM, llama.cpp, `transformers serve`)."""

    base_url: str  # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # the NAME of the environment variable holding the key, never the key itself
    readout: str = "auto"  # auto: log-probabilities when the server returns them, else the text; logprobs; text
    top_logprobs: int = 20  # alternatives asked for at the first generated token
    seed: int = 0
    extra_body: dict[str, Any] = field(default_factory=dict)  # server-specific fields, e.g. vLLM's skip_special_tokens
    concurrency: int = 8  # requests in flight per actor
    requests_per_s: float | None = None  # the whole agent's limit, over all its actors; None: none
    timeout_s: float = 60.0
    max_retries: int = 4  # of a request on 408/409/429/5xx, a timeout or a dropped connection
    max_retry_wait_s: float = 60.0  # the longest Retry-After honoured; backoff is 0.5 s doubling to 8 s, jittered
    max_requests: int | None = None  # this run's budget of requests sent (retries included); None: none
    max_tokens: int | None = None  # this run's budget of tokens (prompt and completion); None: none

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: {self.base_url!r} is not an http(s) URL")
        if self.api_key_env is not None and not ENV_NAME.fullmatch(self.api_key_env):
            raise ValueError(  # the value is not shown: it may be the key itself
                "api_key_env: the value is not an environment variable's name (the key itself never goes in a config)"
            )
        if self.readout not in READOUTS:
            raise ValueError(f"readout: {self.readout!r} is not one of {list(READOUTS)}")
        for key in ("top_logprobs", "concurrency"):
            check_range(key, getattr(self, key), low=1)
        for key in ("timeout_s", "max_retry_wait_s"):
            check_range(key, getattr(self, key), above=0)
        check_range("max_retries", self.max_retries, low=0)
        for key in ("requests_per_s", "max_requests", "max_tokens"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), above=0)


# How an endpoint agent runs and what it may spend, not what it predicts: left out of its run id.
ENDPOINT_RUNTIME = (
    "api_key_env",
    "concurrency",
    "requests_per_s",
    "timeout_s",
    "max_retries",
    "max_retry_wait_s",
    "max_requests",
    "max_tokens",
)


@dataclass
class AgentSpec:
    name: str
    model: str  # hub id, local path, packaged name (smollm2), run:<run name>, sweep:<sweep name>:best; an
    # endpoint agent's: the model name the server serves
    mode: Mode = Mode.ZERO_SHOT
    strategy: Strategy | None = None  # behavior_token, generate or choice; None: the mode's default
    design: TokenDesign | None = None  # behaviorsft: read from the model directory when absent (endpoint: default)
    replicas: int | None = None  # actors; None: as many as the cluster's CPUs (GPUs) hold (hf), else 1
    num_cpus: float | None = None  # per actor; None: 1, or 0.25 for an endpoint agent (it waits on the network)
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor, e.g. {node_b: 1}
    batch_size: int = 16
    dtype: str = "auto"
    trust_remote_code: bool = False
    backend: str = "hf"  # hf: transformers, any strategy; vllm: harness.evaluate.vllm (GPU; behavior_token, choice);
    # endpoint: an OpenAI-compatible server (harness.evaluate.endpoint), any strategy
    endpoint: EndpointSettings | None = None  # backend endpoint only

    def __post_init__(self) -> None:
        problem = name_problem(self.name)
        if problem:
            raise ValueError(f"name: {problem}")
        problem = reference_problem(self.model)
        if problem:
            raise ValueError(f"model: {self.model}: {problem}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: {self.backend!r} is not one of {list(BACKENDS)}")
        if (self.backend == "endpoint") != (self.endpoint is not None):
            raise ValueError("endpoint: an endpoint agent (backend: endpoint) needs an endpoint section; others none")
        if self.num_cpus is None:
            self.num_cpus = 0.25 if self.backend == "endpoint" else 1.0
        self.mode = parse_mode(self.mode, "mode")
        self.strategy = parse_strategy(self.strategy, self.mode, "strategy")
        if self.backend == "vllm" and self.strategy is Strategy.GENERATE:
            raise ValueError("backend: vllm selects with one token (behavior_token or choice); generate needs hf")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError('backend: vllm is not installed (pip install -e ".[vllm]" on a GPU node)')
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        if self.replicas is not None:
            check_range("replicas", self.replicas, low=1)
        check_range("batch_size", self.batch_size, low=1)
        check_range("num_cpus", self.num_cpus, above=0)
        check_range("num_gpus", self.num_gpus, low=0)
        for name, amount in sorted(self.resources.items()):
            check_range(f"resources.{name}", amount, low=0)


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
    content: bool = True  # generate answers on proactive tasks for every agent, and grade what they name
    judge: AgentSpec | None = None  # a model that grades those answers against the reference (data without evidence)
    max_new_tokens: int = 32
    max_prompt_tokens: int = 1024
    bootstrap: int = 1000
    part_size: int = 256  # tasks per Ray Data batch and per prediction part: what a killed job keeps
    tracking: TrackingSettings = field(default_factory=TrackingSettings)  # its experiment defaults to eval
    address: str | None = None  # the Ray cluster (HOST:PORT); None: $RAY_ADDRESS, else a local cluster

    def __post_init__(self) -> None:
        names = [a.name for a in self.agents]
        if not names:
            raise ValueError("agents: at least one agent is needed")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"agents: duplicate name(s) {duplicated}")
        for key, low in (("part_size", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 1), ("bootstrap", 0)):
            check_range(key, getattr(self, key), low=low)
        if self.max_tasks is not None:
            check_range("max_tasks", self.max_tasks, low=1)
        if self.judge is not None and self.judge.name in names:
            raise ValueError(f"judge: name: {self.judge.name!r} is an agent's name too")
        if self.judge is not None and self.judge.backend == "vllm":
            raise ValueError("judge: backend: a judge is an hf or an endpoint agent")
        if self.split not in SPLITS:
            raise ValueError(f"split: {self.split!r} is not one of {list(SPLITS)}")
