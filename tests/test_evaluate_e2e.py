"""Real Ray Data evaluations of agents on the tiny model, in parallel, with resume."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from harness.agents.loading import load_tokenizer
from harness.agents.making import add_behavior_tokens
from harness.agents.selection import chat_template_sha256
from harness.agents.tokens import TokenDesign
from harness.core import config
from harness.core.errors import HarnessError
from harness.data.io import load_tasks
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.driver import evaluate
from harness.evaluate.hf import AgentPredictor
from harness.evaluate.runs import ResolvedAgent
from harness.results import leaderboard
from harness.results.predictions import SCHEMA, TASK_COLUMNS, Prediction, score_map

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def behavior_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with BehaviorSFT tokens added (untrained): what a behaviorsft agent loads."""
    out = tmp_path_factory.mktemp("bsft") / "model"
    return add_behavior_tokens(tiny_model, out, TokenDesign(granularity="task_type"), load_taxonomy())


def _config(sample, tiny_model, behavior_model, tmp_path, **extra) -> dict:
    return {
        "data": str(sample),
        "split": "test",
        "output_dir": str(tmp_path / "eval"),
        "leaderboard": str(tmp_path / "lb.parquet"),
        "max_new_tokens": 6,
        "bootstrap": 100,
        **extra,
        "agents": [
            {"name": "zero-shot", "model": str(tiny_model), "mode": "zero_shot", "num_cpus": 0.5, "batch_size": 8},
            {"name": "bsft", "model": str(behavior_model), "mode": "behaviorsft", "num_cpus": 0.5, "batch_size": 8},
        ],
    }


class _Holder:
    def ready(self) -> bool:
        return True


def _a_job_ending_as_this_one_starts(ray) -> threading.Timer:
    """An actor that holds a CPU when the evaluation starts and ends 3 s into it."""
    holder = ray.remote(num_cpus=1)(_Holder).remote()
    ray.get(holder.ready.remote())
    ending = threading.Timer(3.0, ray.kill, args=(holder,))
    ending.start()
    return ending


def test_two_agents_in_parallel_then_a_rerun_does_nothing(sample, tiny_model, behavior_model, tmp_path, ray_local):
    cfg = config.build(EvalConfig, _config(sample, tiny_model, behavior_model, tmp_path, part_size=16))
    ending = _a_job_ending_as_this_one_starts(ray_local)
    result = evaluate(cfg)
    ending.join()
    assert result.failures == []
    table = result.metrics
    leaderboard.append(cfg.leaderboard, table)
    tasks = pd.read_json(sample, lines=True).query("split == 'test'")
    test_ids = set(tasks.task_id)
    out = Path(cfg.output_dir)
    finals = sorted(out.glob("*.parquet"))
    assert len(finals) == 2
    for path in finals:
        predictions = pd.read_parquet(path)
        schema = pq.read_schema(path)
        assert schema.names == SCHEMA.names
        for field in SCHEMA:
            assert schema.field(field.name).type == field.type, (field.name, schema.field(field.name).type)
        assert set(predictions.task_id) == test_ids and predictions.task_id.is_unique
        assert set(predictions.pred_behavior) <= {"reactive", "proactive"}
    bsft = pd.read_parquet(next(p for p in finals if p.name.startswith("bsft")))
    assert set(bsft.pred_label) <= {"reactive", "proactive", "restraint"}
    labels = [list(score_map(s)) for s in bsft.scores]  # the design's labels, in the taxonomy's order
    assert all(found == labels[0] and found[:2] == ["reactive", "proactive"] for found in labels)
    assert (bsft.latency_ms > 0).all()
    assert set(bsft.readout) == {"logprobs"}
    assert set(bsft.strategy) == {"behavior_token"} and bsft.answer.notna().all()
    # the audit: each row's rendered prompt ends with its conversation's last turn, under the model's template
    last_turn = tasks.set_index("task_id").messages.map(lambda messages: messages[-1]["content"])
    assert all(last_turn[t] in p for t, p in zip(bsft.task_id, bsft.prompt, strict=True))
    assert (bsft.prompt_tokens > 0).all() and bsft.chat_template_sha256.nunique() == 1
    zero = pd.read_parquet(next(p for p in finals if p.name.startswith("zero-shot")))
    assert set(zero.strategy) == {"choice"} and set(zero.pred_label) <= {"reactive", "proactive"}
    assert all(sorted(score_map(s)) == ["proactive", "reactive"] for s in zero.scores)
    graded = (zero.task_type == "proactive") & (zero.pred_behavior == "proactive")
    assert graded.any()
    assert (zero.answer[~graded] == "").all()  # a choice prompt asks for a letter: no answer is generated
    assert (bsft.case_id == bsft.task_id.map(dict(zip(tasks.task_id, tasks.case_id, strict=True)))).all()
    assert set(table.agent) == {"zero-shot", "bsft"}
    # Both agents (half a CPU each) share one pool, which fills the cluster's 2 CPUs with 2 actors, though one was
    # held when the job started: the second actor starts once it frees.
    assert [json.loads(p.read_text())["actors"] for p in sorted(out.glob("*.record.json"))] == [2, 2]
    before = leaderboard.read(cfg.leaderboard)
    parts = sorted(out.glob("*/part-*.parquet"))
    # Several parts per agent: progress is kept as it comes. 48 tasks in parts of 16 leave no short last part,
    # which Ray Data may bundle with a full one when it arrives first (parts of 32 gave 1 part per agent once).
    assert len(parts) >= 2 * 2

    leaderboard.append(cfg.leaderboard, evaluate(cfg).metrics)
    assert sorted(out.glob("*/part-*.parquet")) == parts  # nothing re-run
    after = leaderboard.read(cfg.leaderboard)
    assert len(after) == len(before) and set(after.run_id) == set(before.run_id)


def test_killed_evaluation_resumes_without_duplicates(sample, tiny_model, behavior_model, tmp_path, ray_local):
    """A killed driver of the suite's Ray cluster (as a job on a running cluster), then the same command."""
    values = _config(sample, tiny_model, behavior_model, tmp_path, part_size=4, max_tasks=24, max_new_tokens=24)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(values))
    args = [sys.executable, "-m", "harness.cli", "eval", "--config", str(path)]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    out = tmp_path / "eval"
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while len(list(out.glob("*/part-*.parquet"))) < 2 and time.time() < deadline:
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    kept = {p.name for p in out.glob("*/part-*.parquet")}
    assert kept and not list(out.glob("*.parquet")), "the job was meant to die before finishing"

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert kept <= {p.name for p in out.glob("*/part-*.parquet")}
    test_ids = set(sorted(pd.read_json(sample, lines=True).query("split == 'test'").task_id)[:24])
    for final in out.glob("*.parquet"):
        predictions = pd.read_parquet(final)
        assert predictions.task_id.is_unique and set(predictions.task_id) == test_ids
    board = leaderboard.read(values["leaderboard"])
    assert board.groupby(["agent", "subset", "slice_kind", "slice_value", "metric"]).size().max() == 1
    assert "bsft" in second.stdout and "zero-shot" in second.stdout


def test_a_failing_agent_is_reported_in_one_line_and_the_others_are_recorded(
    sample, tiny_model, behavior_model, tmp_path, ray_local
):
    broken = tmp_path / "broken-model"  # a config but no weights: loading fails inside the Ray actor
    broken.mkdir()
    (broken / "config.json").write_text((Path(tiny_model) / "config.json").read_text())
    # Every batch fails: its tokenizer turns " the" into an id past the model's embeddings (a mismatched pair).
    garbled = tmp_path / "garbled-model"
    shutil.copytree(tiny_model, garbled)
    tokenizer = load_tokenizer(str(garbled))
    tokenizer.add_tokens([" the"])
    tokenizer.save_pretrained(garbled)
    values = _config(sample, tiny_model, behavior_model, tmp_path, part_size=64, max_tasks=40)
    values["agents"] = values["agents"][1:]  # one agent that works, besides the two that fail
    for name, model in (("broken", broken), ("garbled", garbled)):
        values["agents"].append({"name": name, "model": str(model), "mode": "zero_shot", "num_cpus": 0.25})
    cfg = config.build(EvalConfig, values)
    result = evaluate(cfg)
    messages = dict(zip(("broken", "garbled"), sorted(result.failures), strict=True))
    logs = {}
    for name, message in messages.items():
        assert "\n" not in message and message.startswith(f"agent {name}: ")
        logs[name] = Path(message.split("(full traceback: ")[1].rstrip(")").split(")")[0])
        assert logs[name].exists() and "Traceback" in logs[name].read_text()
    # Finite retries: the failing batch was tried BATCH_TRIES (2) times, then reported with its root cause.
    assert messages["garbled"] == (
        f"agent garbled: IndexError: index out of range in self (the batch failed 2 times) (full traceback: "
        f"{logs['garbled']})"
    )
    leaderboard.append(cfg.leaderboard, result.metrics)
    with pytest.raises(HarnessError) as failure:
        result.raise_failures(cfg.leaderboard)
    assert str(failure.value) == f"{'; '.join(result.failures)}; the other agents are recorded in {cfg.leaderboard}"
    board = leaderboard.read(cfg.leaderboard)
    assert set(board.agent) == {"bsft"}  # the other agent finished and was recorded
    finals = sorted(p.name.split("-")[0] for p in Path(cfg.output_dir).glob("*.parquet"))
    assert finals == ["bsft"]
    assert all(len(pd.read_parquet(p)) == 40 for p in Path(cfg.output_dir).glob("*.parquet"))


def test_content_is_graded_by_evidence_and_by_a_judge(sample, tiny_model, behavior_model, tmp_path, ray_local):
    from sklearn.metrics import cohen_kappa_score

    judge = {"name": "tiny-judge", "model": str(tiny_model), "num_cpus": 0.5, "batch_size": 8}
    values = _config(sample, tiny_model, behavior_model, tmp_path, part_size=16, judge=judge)
    result = evaluate(config.build(EvalConfig, values))
    assert result.failures == []
    rows = result.metrics
    for agent in ("zero-shot", "bsft"):
        graded = rows[(rows.agent == agent) & (rows.grader != "")]
        assert set(graded.grader) == {"evidence", "judge:tiny-judge"}
        assert {"caught", "vague_or_wrong", "caught_diff", "caught_mcnemar_p"} <= set(graded.metric)
        assert rows[(rows.agent == agent) & (rows.metric == "macro_f1")].grader.eq("").all()
    out = Path(values["output_dir"])
    grades = {path.parent.name.split("-")[0]: pd.read_parquet(path) for path in out.glob("*/grades.parquet")}
    assert sorted(grades) == ["bsft", "zero"]
    pairs = []
    for frame in grades.values():
        assert set(frame.grade) <= {"caught", "wrong", "vague", "none"}
        exact = frame[frame.grader == "evidence"].set_index("task_id").grade
        judged = frame[frame.grader == "judge:tiny-judge"].set_index("task_id").grade
        assert set(judged.index) == set(exact.index)
        pairs.append(pd.DataFrame({"exact": exact, "judge": judged.loc[exact.index]}))
    both = pd.concat(pairs).query("exact != 'none'")  # the judge's verdicts: on interventions only
    saved = json.loads((out / "judge-tiny-judge.agreement.json").read_text())
    assert saved["n"] == len(both)
    assert saved["kappa"] == pytest.approx(cohen_kappa_score(both.exact, both.judge), nan_ok=True)
    assert any("judge tiny-judge: Cohen's kappa" in note for note in result.notes)
    table = leaderboard.ranking(rows)
    assert set(table.grader) == {"evidence"} and table.caught.between(0, 1).all()


def test_max_tasks_takes_the_first_tasks_by_id(sample, tiny_model, behavior_model, tmp_path, ray_local):
    values = _config(sample, tiny_model, behavior_model, tmp_path, part_size=16, max_tasks=20, answers=False)
    values["agents"] = values["agents"][1:]
    evaluate(config.build(EvalConfig, values))
    (final,) = Path(values["output_dir"]).glob("*.parquet")
    expected = sorted(pd.read_json(sample, lines=True).query("split == 'test'").task_id)[:20]
    assert list(pd.read_parquet(final).task_id) == expected


def test_smollm2_prompt_only_agents_through_the_ray_data_path(sample, smollm2_model, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(smollm2_model.parent))  # the reference `smollm2` resolves there
    agents = [
        {"name": name, "model": "smollm2", "mode": name.replace("-", "_"), "num_cpus": 0.5, "batch_size": 4}
        for name in ("zero-shot", "instructed")
    ]
    values = {
        "data": str(sample),
        "max_tasks": 6,
        "bootstrap": 50,
        "output_dir": str(tmp_path / "eval"),
        "agents": agents,
    }
    result = evaluate(config.build(EvalConfig, values))
    assert result.failures == [] and set(result.metrics.agent) == {"zero-shot", "instructed"}
    frames = {p.name.split("-")[0]: pd.read_parquet(p) for p in (tmp_path / "eval").glob("*.parquet")}
    assert sorted(frames) == ["instructed", "zero"]
    for frame in frames.values():
        assert len(frame) == 6 and set(frame.strategy) == {"choice"}
        scores = [score_map(s) for s in frame.scores]
        assert all(sorted(s) == ["proactive", "reactive"] and all(v < 0 for v in s.values()) for s in scores)
        chosen = [max(s, key=s.get) for s in scores]
        assert chosen == list(frame.pred_behavior)
        assert frame.prompt.str.startswith("<|im_start|>system").all()  # SmolLM2's own chat template
        assert set(frame.chat_template_sha256) == {chat_template_sha256(load_tokenizer(str(smollm2_model)))}
        graded = (frame.task_type == "proactive") & (frame.pred_behavior == "proactive")
        assert (frame.answer[~graded] == "").all()  # a choice prompt asks for a letter: no answer is generated...
        assert frame.answer[graded].str.strip().ne("").all()  # ...but where it intervened on a proactive task
    # the instructions change what the model sees, so its scores move
    assert [score_map(s) for s in frames["zero"].scores] != [score_map(s) for s in frames["instructed"].scores]


def test_an_hf_choice_agent_answers_where_it_intervened_on_a_proactive_task(sample, smollm2_model):
    """In process, on SmolLM2 (a random tiny model may end its answer at once): the answer that gets graded."""
    spec = {"name": "zero-shot", "model": str(smollm2_model), "mode": "zero_shot", "batch_size": 2}
    cfg = config.build(EvalConfig, {"data": str(sample), "max_new_tokens": 12, "agents": [spec]})
    agent = ResolvedAgent(cfg.agents[0], str(smollm2_model), None, "run")
    predictor = AgentPredictor([agent], cfg, {"zero-shot": set()})
    assert predictor.failures == {}
    tasks = load_tasks(sample, split="test")
    proactive = tasks[tasks.task_type == "proactive"].head(2)
    batch = {column: list(proactive[column]) for column in (*TASK_COLUMNS, "messages")}
    chosen = [Prediction("choice", pred_behavior=b, pred_label=b, answer="") for b in ("proactive", "reactive")]
    predictor._answer_proactive(predictor.selectors["zero-shot"], batch, chosen, batch_size=2)
    assert chosen[0].answer.strip() and "<|im_end|>" not in chosen[0].answer  # it intervened: asked for an answer
    assert chosen[1].answer == ""  # it did not: graded `none`, nothing generated
