"""The pure parts of the vLLM backend (request building, reading log-probs); vLLM itself is not installed."""

import importlib.util

import pytest

from harness.core.errors import ConfigError
from harness.evaluate.config import AgentSpec
from harness.evaluate.vllm import parse_selection, prediction_row, sampling_params, single_token_ids

LABELS, IDS = ["reactive", "proactive"], [2050, 2051]
BEHAVIORS = {"reactive": "reactive", "proactive": "proactive"}


def test_sampling_params_ask_for_one_greedy_label_token_with_enough_logprobs():
    params = sampling_params(IDS, logprobs=1)
    assert params == {"max_tokens": 1, "temperature": 0.0, "allowed_token_ids": IDS, "logprobs": 2}
    assert sampling_params(IDS)["logprobs"] == 20


def test_multi_token_labels_are_refused_with_the_label_named():
    assert single_token_ids("a", LABELS, [[5], [7]]) == [5, 7]
    with pytest.raises(ConfigError, match=r"agent a: .*'proactive' is 2 tokens"):
        single_token_ids("a", LABELS, [[5], [7, 8]])


def test_the_best_label_wins_whatever_the_key_and_record_shape():
    records = [{2050: {"logprob": -0.2, "rank": 1}, 2051: {"logprob": -1.9, "rank": 2}, 9: {"logprob": -3.0}}]
    chosen = parse_selection(records, LABELS, IDS, BEHAVIORS)
    assert (chosen.behavior, chosen.label, chosen.answer) == ("reactive", "reactive", "")
    assert chosen.scores == {"reactive": -0.2, "proactive": -1.9}
    # after Arrow: string keys, bare numbers, and missing keys filled with None
    chosen = parse_selection([{"2050": None, "2051": -0.7, "17": -0.1}], LABELS, IDS, BEHAVIORS)
    assert chosen.label == "proactive"
    assert chosen.scores == {"reactive": None, "proactive": -0.7}


def test_no_label_among_the_logprobs_is_an_error_row_not_a_guess():
    row = {"task_id": "t", "case_id": "c", "agent": "a", "category": "x", "task_type": "reactive"}
    row |= {"gold_behavior": "reactive", "hard": False, "strategy": "behavior_token", "logprobs": [{"3": -0.1}]}
    row |= {"prompt": "<|im_start|>user ...", "prompt_tokens": 3, "chat_template_sha256": "ab"}
    out = prediction_row(row, LABELS, IDS, BEHAVIORS)
    assert out["error"].startswith("ValueError: none of the label tokens") and out["pred_label"] is None
    out = prediction_row({**row, "logprobs": [{"2051": -0.1}]}, LABELS, IDS, BEHAVIORS)
    assert (out["error"], out["pred_behavior"], out["task_id"]) == ("", "proactive", "t")
    assert (out["prompt"], out["prompt_tokens"], out["chat_template_sha256"]) == ("<|im_start|>user ...", 3, "ab")
    out = prediction_row({**row, "__inference_error__": "CUDA out of memory"}, LABELS, IDS, BEHAVIORS)
    assert out["error"] == "CUDA out of memory" and out["scores"] is None


def test_agent_backend_is_checked():
    assert AgentSpec("a", "m").backend == "hf"
    with pytest.raises(ValueError, match=r"backend: 'tpu' is not one of \['hf', 'vllm', 'endpoint'\]"):
        AgentSpec("a", "m", backend="tpu")
    with pytest.raises(ValueError, match="generate needs hf"):
        AgentSpec("a", "m", mode="sft", backend="vllm")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_backend_vllm_without_vllm_is_one_clear_line():
    with pytest.raises(ValueError, match=r"backend: vllm is not installed \(pip install"):
        AgentSpec("a", "m", mode="behaviorsft", backend="vllm")
