"""Endpoint agents against real HTTP servers on 127.0.0.1: a small OpenAI-compatible server of the tests' own
(`tests/chat_server.py`, which can return `top_logprobs` and misbehave on cue) and `transformers serve`."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from harness.agents.tokens import TokenDesign
from harness.core import config
from harness.core.errors import ConfigError
from harness.core.storage import location
from harness.data.io import load_tasks
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import AgentSpec, EndpointSettings, EvalConfig
from harness.evaluate.driver import evaluate
from harness.evaluate.endpoint import EndpointPredictor, Ledger, Reader, _retry_after, backoff
from harness.evaluate.runs import ResolvedAgent
from harness.results import leaderboard
from harness.results.predictions import score_map
from tests.chat_server import ChatServer, Fault, intervenes
from tests.ray_nodes import free_port

KEY_ENV = "BBH_TEST_API_KEY"
FAKE_KEY = "sk-test-FAKE-4f9c2a7e1b8d"  # recognisable: grepped for in every file a run writes


def _agent(base_url: str, mode: str = "behaviorsft", model: str = "fake-clinician", **settings) -> ResolvedAgent:
    spec = AgentSpec(
        name="api", model=model, mode=mode, backend="endpoint", endpoint=EndpointSettings(base_url=base_url, **settings)
    )
    return ResolvedAgent(spec, f"{base_url}#{model}", TokenDesign() if mode == "behaviorsft" else None, "r1")


def _predict(agent: ResolvedAgent, tasks: dict[str, list], responses: Path, ray_local) -> tuple[dict, dict]:
    """One batch through the predictor, in this process (no Ray Data), and what its ledger counted."""
    settings = agent.spec.endpoint
    ledger = ray_local.remote(num_cpus=0)(Ledger).remote(
        settings.requests_per_s, settings.max_requests, settings.max_tokens
    )
    predictor = EndpointPredictor(agent, EvalConfig(agents=[agent.spec]), set(), ledger, location(responses, "x"))
    out = predictor(tasks)
    time.sleep(0.2)  # the ledger's counts are sent without waiting
    return out, ray_local.get(ledger.usage.remote())


@pytest.fixture(scope="module")
def tasks(sample) -> dict[str, list]:
    frame = load_tasks(sample, split="test").head(6)
    return {column: list(frame[column]) for column in frame.columns}


def test_the_first_tokens_logprobs_choose_the_behavior_and_every_row_says_so(tasks, tmp_path, ray_local):
    server = ChatServer()
    out, usage = _predict(_agent(server.base_url), tasks, tmp_path / "responses", ray_local)
    assert out["error"] == [""] * 6 and set(out["readout"]) == {"logprobs"}
    expected = ["proactive" if intervenes(m) else "reactive" for m in tasks["messages"]]
    assert out["pred_behavior"] == expected and len(set(expected)) == 2
    for scores, behavior in zip(out["scores"], expected, strict=True):
        assert score_map(scores)[behavior] == -0.1
    sent = server.seen[0].body
    assert sent["logprobs"] is True and sent["top_logprobs"] == 20 and sent["temperature"] == 0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]  # chat messages, not a rendered prompt
    assert (usage["requests"], usage["answered"], usage["retries"]) == (6, 6, 0)
    server.stop()


def test_a_choice_agent_that_intervened_is_asked_for_an_answer_to_grade(tasks, tmp_path, ray_local):
    server = ChatServer()
    out, usage = _predict(_agent(server.base_url, mode="zero_shot"), tasks, tmp_path / "responses", ray_local)
    graded = [
        kind == "proactive" and behavior == "proactive"
        for kind, behavior in zip(tasks["task_type"], out["pred_behavior"], strict=True)
    ]
    assert any(graded) and not all(graded)
    asked = [seen.body for seen in server.seen if "Reply with the letter" not in seen.body["messages"][-1]["content"]]
    assert len(asked) == sum(graded) and usage["requests"] == 6 + sum(graded)
    assert all("logprobs" not in body and body["max_tokens"] == EvalConfig.max_new_tokens for body in asked)
    for answer, needed in zip(out["answer"], graded, strict=True):  # the others keep the letter they chose
        assert answer == "<behavior:proactive> Caution: check this first." if needed else answer in ("A", "B")
    server.stop()


def test_a_server_that_ignores_logprobs_is_read_from_its_text(tasks, tmp_path, ray_local):
    server = ChatServer(logprobs=False)
    out, _ = _predict(_agent(server.base_url, mode="zero_shot"), tasks, tmp_path / "responses", ray_local)
    assert set(out["readout"]) == {"text"} and out["scores"] == [None] * 6
    assert out["pred_behavior"] == ["proactive" if intervenes(m) else "reactive" for m in tasks["messages"]]
    assert set(out["pred_label"]) == {"proactive", "reactive"}  # the option letters, read strictly
    assert "Reply with the letter" in server.seen[0].body["messages"][-1]["content"]
    server.stop()


def test_the_response_cache_means_a_rerun_sends_nothing(tasks, tmp_path, ray_local):
    server = ChatServer()
    first, _ = _predict(_agent(server.base_url), tasks, tmp_path / "responses", ray_local)
    again, usage = _predict(_agent(server.base_url), tasks, tmp_path / "responses", ray_local)
    assert len(server.seen) == 6 and (usage["requests"], usage["cached"]) == (0, 6)
    assert again["pred_behavior"] == first["pred_behavior"]
    server.stop()


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("wrong key", f"answered 401 (a wrong or missing key in ${KEY_ENV}): Incorrect API key provided."),
        ("unknown model", "answered 404 (an unknown model or a wrong base_url?): The model does not exist."),
        ("not json", "answered with a body that is not JSON"),
        ("no choices", "answered with no choices"),
        ("ignores logprobs", "returned no logprobs (it ignores them); set endpoint.readout: text (or auto)"),
        ("unreachable", "unreachable (Connection refused), 2 times"),
        ("hangs", "did not answer within 0.5 s, 2 times"),
        ("retry-after too long", "answered 429 asking to retry after 600 s, more than max_retry_wait_s (60 s)"),
    ],
)
def test_a_bad_endpoint_is_one_line_naming_what_went_wrong(case, problem, tasks, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong" if case == "wrong key" else FAKE_KEY)
    faults = {
        "not json": Fault(raw="<html>bad gateway</html>"),
        "no choices": Fault(raw='{"id": "x", "choices": []}'),
        "hangs": Fault(hang_s=3),
        "retry-after too long": Fault(status=429, headers={"Retry-After": "600"}),
    }
    server = ChatServer(key=FAKE_KEY, logprobs=case != "ignores logprobs", fault=lambda n: faults.get(case))
    url = f"http://127.0.0.1:{free_port()}/v1" if case == "unreachable" else server.base_url
    settings = {"api_key_env": KEY_ENV, "max_retries": 1, "timeout_s": 0.5, "concurrency": 1}
    if case == "ignores logprobs":
        settings["readout"] = "logprobs"
    agent = _agent(url, model="nope" if case == "unknown model" else "fake-clinician", **settings)
    out, usage = _predict(agent, tasks, tmp_path / "responses", ray_local)
    assert out["error"] == [f"EndpointError: endpoint {url}: {problem}"] * 6
    assert len(server.seen) <= 2 and usage["failed"] == 1  # the agent stops at the first: nothing more is sent
    assert FAKE_KEY not in json.dumps(out)
    server.stop()


def test_retries_honour_retry_after_then_back_off(tasks, tmp_path, ray_local):
    plan = {0: Fault(429, {"Retry-After": "1"}), 1: Fault(429, {"retry-after-ms": "600"}), 2: Fault(503), 3: Fault(500)}
    server = ChatServer(fault=plan.get)
    one = {key: values[:1] for key, values in tasks.items()}
    out, usage = _predict(_agent(server.base_url, concurrency=1), one, tmp_path / "responses", ray_local)
    assert out["error"] == [""] and (usage["requests"], usage["retries"], usage["answered"]) == (5, 4, 1)
    at = [seen.at for seen in server.seen]
    assert at[1] - at[0] >= 0.95 and 0.55 <= at[2] - at[1] < 0.95  # as each Retry-After asked
    assert 0.95 <= at[3] - at[2] <= 2.3 and 1.95 <= at[4] - at[3] <= 4.3  # backoff of the 3rd and 4th try: 2 s, 4 s
    assert usage["error_rate"] == pytest.approx(0.8)
    server.stop()


def test_a_server_killed_mid_run_and_restarted_loses_no_task(tasks, tmp_path, ray_local):
    server = ChatServer()
    answered = threading.Event()

    def restart() -> None:
        answered.wait(10)
        server.stop()
        time.sleep(1.0)
        server.start()

    def fault(n: int) -> Fault | None:
        if n == 1:
            answered.set()
        return None

    server.fault = fault
    threading.Thread(target=restart, daemon=True).start()
    out, usage = _predict(_agent(server.base_url, concurrency=1, max_retries=5), tasks, tmp_path / "r", ray_local)
    assert out["error"] == [""] * 6 and usage["answered"] == 6 and usage["retries"] >= 1
    server.stop()


def test_reading_options_and_retry_headers():
    reader = Reader(_agent("http://127.0.0.1:9/v1", mode="zero_shot"), load_taxonomy())
    completion = {"choices": [{"message": {"content": "B) Intervene: the allergy."}}]}
    assert reader.read(completion)[0].behavior == "proactive"
    completion = {"choices": [{"message": {"content": "Because the dose is wrong, I would flag it."}}]}
    reading = reader.read(completion)[0]  # no letter: the answer rule reads the text
    assert (reading.behavior, reading.label, reading.readout) == ("proactive", "", "text")
    assert _retry_after({"retry-after": "2"}, 60) == 2 and _retry_after({"retry-after": "120"}, 60) is None
    assert _retry_after({"retry-after-ms": "250"}, 60) == 0.25 and _retry_after({}, 60) is None
    assert all(0.25 <= backoff(0) <= 0.5 and 4 <= backoff(5) <= 8 for _ in range(20))


def test_the_key_itself_is_refused_in_a_config(tmp_path):
    path = tmp_path / "eval.yaml"
    agent = {"name": "a", "model": "m", "backend": "endpoint", "endpoint": {"base_url": "http://h/v1"}}
    path.write_text(json.dumps({"agents": [{**agent, "endpoint": {**agent["endpoint"], "api_key_env": FAKE_KEY}}]}))
    with pytest.raises(ConfigError) as refused:
        config.load(EvalConfig, path)
    assert str(refused.value).endswith("is not an environment variable's name (the key itself never goes in a config)")
    assert FAKE_KEY not in str(refused.value)


def _every_file(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_a_local_agent_and_two_endpoint_agents_rank_side_by_side(
    sample, tiny_model, tmp_path, no_suite_ray, monkeypatch
):
    """One evaluation: the tiny model through `hf`, a keyed endpoint with logprobs (two actors sharing one rate
    limit) and one without; then the key is nowhere on disk, and the usage is in the record and tracking."""
    import ray

    monkeypatch.setenv(KEY_ENV, FAKE_KEY)  # before Ray starts: its workers inherit this environment
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(tiny_model.parent))
    keyed, plain = ChatServer(key=FAKE_KEY), ChatServer(logprobs=False)
    endpoint = {"backend": "endpoint", "model": "fake-clinician"}
    cfg = config.build(
        EvalConfig,
        {
            "data": str(sample),
            "max_tasks": 40,
            "output_dir": str(tmp_path / "eval"),
            "leaderboard": str(tmp_path / "results" / "leaderboard.parquet"),
            "bootstrap": 50,
            "part_size": 8,
            "agents": [
                {"name": "local", "model": "tiny-qwen2", "mode": "zero_shot", "num_cpus": 0.5},
                {
                    **endpoint,
                    "name": "served-bsft",
                    "mode": "behaviorsft",
                    "replicas": 2,
                    "endpoint": {"base_url": keyed.base_url, "api_key_env": KEY_ENV, "requests_per_s": 20},
                },
                {**endpoint, "name": "served-zs", "mode": "zero_shot", "endpoint": {"base_url": plain.base_url}},
            ],
        },
    )
    try:
        result = evaluate(cfg)  # starts a local cluster, as `harness eval` would
    finally:
        ray.shutdown()
    assert result.failures == []
    leaderboard.append(cfg.leaderboard, result.metrics)
    ranking = leaderboard.ranking(leaderboard.read(cfg.leaderboard)).set_index("agent")
    assert ranking.readout.to_dict() == {"local": "logprobs", "served-bsft": "logprobs", "served-zs": "text"}
    assert len(keyed.seen) == 40 and all(s.authorization == f"Bearer {FAKE_KEY}" for s in keyed.seen)
    at = sorted(s.at for s in keyed.seen)  # two actors, one limit: 20 requests a second between them
    # Slots are 50 ms apart, so the 40th request is sent 1.95 s after the first, and the 5th at most 0.2 s after
    # it; a limit per actor (40 a second in all) would end the whole run in under a second. A busy machine delays
    # arrivals by a few hundred ms (HTTP's own jitter, a new connection's setup), which only shortens this span.
    assert at[-1] - at[4] >= 1.4, f"40 requests arrived over {at[-1] - at[0]:.2f} s"

    eval_dir = tmp_path / "eval"
    (record_file,) = eval_dir.glob("served-bsft-*.record.json")
    usage = json.loads(record_file.read_text())["endpoint_usage"]
    assert (usage["requests"], usage["answered"], usage["failed"]) == (40, 40, 0) and usage["prompt_tokens"] > 0
    named = [r for r in (tmp_path / "mlruns").glob("*/*") if (r / "tags" / "mlflow.runName").exists()]
    runs = {(r / "tags" / "mlflow.runName").read_text(): r for r in named}
    (run,) = (r for name, r in runs.items() if name.startswith("served-bsft-"))
    answered = run / "metrics" / "endpoint" / "answered"  # MLflow's file store: timestamp, value, step
    assert answered.read_text().split()[1] == "40.0"
    logs = Path(os.environ["HARNESS_LOG_DIR"])
    leaked = [str(p) for p in _every_file(tmp_path, logs) if FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    keyed.stop()
    plain.stop()


@pytest.mark.slow
def test_a_budget_stops_cleanly_and_a_rerun_pays_only_for_the_rest(sample, tmp_path, ray_local):
    server = ChatServer()
    agent = {
        "name": "api",
        "model": "fake-clinician",
        "mode": "behaviorsft",
        "backend": "endpoint",
        "endpoint": {"base_url": server.base_url, "max_requests": 12, "concurrency": 2},
    }
    values = {"data": str(sample), "max_tasks": 30, "output_dir": str(tmp_path / "eval"), "bootstrap": 0}
    stopped = evaluate(config.build(EvalConfig, {**values, "part_size": 8, "agents": [agent]}))
    (line,) = stopped.failures
    assert line.startswith("agent api: stopped when its budget ran out (endpoint.max_requests 12, max_tokens None); ")
    assert len(server.seen) == 12 and stopped.metrics.empty
    unlimited = {**agent, "endpoint": {**agent["endpoint"], "max_requests": None}}
    finished = evaluate(config.build(EvalConfig, {**values, "part_size": 8, "agents": [unlimited]}))
    assert finished.failures == [] and len(server.seen) == 30
    assert len({seen.key for seen in server.seen}) == 30  # no request was sent twice
    server.stop()


@pytest.mark.slow
def test_transformers_serve_ranks_beside_the_local_agent(sample, tiny_model, tmp_path, ray_local, monkeypatch):
    """`transformers serve` (a real OpenAI-compatible server that ignores logprobs) on the tiny model, started as
    docs/evaluation.md says, and the same model through `hf`, in one evaluation."""
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(tiny_model.parent))
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(tiny_model)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "transformers serve did not start"
                time.sleep(1)
        served = {"backend": "endpoint", "model": str(tiny_model), "mode": "zero_shot"}
        cfg = config.build(
            EvalConfig,
            {
                "data": str(sample),
                "max_tasks": 24,
                "output_dir": str(tmp_path / "eval"),
                "bootstrap": 0,
                "agents": [
                    {"name": "local", "model": "tiny-qwen2", "mode": "zero_shot", "num_cpus": 0.5},
                    {**served, "name": "served", "endpoint": {"base_url": f"http://127.0.0.1:{port}/v1"}},
                ],
            },
        )
        result = evaluate(cfg)
        assert result.failures == []
        readout = result.metrics.drop_duplicates("agent").set_index("agent").readout.to_dict()
        assert readout == {"local": "logprobs", "served": "text"}  # it ignores logprobs: read from the text
        (served_file,) = (tmp_path / "eval").glob("served-*.parquet")
        predictions = pd.read_parquet(served_file)
        assert len(predictions) == 24 and predictions.answer.notna().all() and set(predictions.readout) == {"text"}
        assert set(predictions.pred_label) <= {"proactive", "reactive", ""}  # a letter read strictly, or none
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
