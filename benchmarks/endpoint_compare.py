"""An endpoint agent against lm-evaluation-harness's `local-chat-completions`, on the same server and tasks: one
`transformers serve` of the tiny model on 127.0.0.1, then each client as a whole process, timed start to exit.

    python -m benchmarks.endpoint_compare [--concurrency 8]    # needs the bench extra (lm_eval)

Both send each test task's conversation as chat messages and generate up to 16 tokens greedily, `concurrency`
requests at a time: the harness as one `harness eval` job (cold: it starts its own Ray) with one endpoint agent
(`strategy: generate`: the server ignores logprobs, so the behavior is read from the text); lm-eval as one
`lm_eval --model local-chat-completions` process on a `generate_until` task whose documents are the same
conversations, flattened into one user turn (lm-eval sends a document as one message).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from benchmarks.lm_eval_compare import OFFLINE, lm_eval_binary
from benchmarks.whole_process import EXECUTION
from harness.agents.loading import load_tokenizer
from harness.agents.making import make_tiny
from harness.cli.logs import LOG_DIR_ENV
from harness.data.io import load_tasks
from harness.data.mini import write_sample

MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(model: Path, port: int) -> subprocess.Popen:
    """`transformers serve` on 127.0.0.1:`port`, once its /health answers."""
    command = [str(Path(sys.executable).parent / "transformers"), "serve", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise SystemExit("transformers serve did not start") from None
            time.sleep(1)


def harness_run(model: Path, data: Path, base_url: str, work: Path, concurrency: int) -> tuple[float, float, int]:
    """One `harness eval` process: its wall time, Ray Data's execution time, and the tasks it predicted."""
    endpoint = {"base_url": base_url, "concurrency": concurrency, "readout": "text"}
    agent = {"name": "served", "backend": "endpoint", "model": str(model), "mode": "zero_shot"}
    agent |= {"strategy": "generate", "endpoint": endpoint}
    config = {
        "data": str(data),
        "split": "test",
        "output_dir": str(work / "eval"),
        "leaderboard": str(work / "leaderboard.parquet"),
        "max_new_tokens": MAX_TOKENS,
        "content": False,
        "agents": [agent],
    }
    work.mkdir(parents=True)
    (work / "eval.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"} | {LOG_DIR_ENV: str(work / "logs")}
    began = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "harness.cli", "eval", "-c", str(work / "eval.yaml")],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - began
    if run.returncode:
        raise SystemExit(f"harness eval exited {run.returncode}: {run.stderr.strip()[-500:]}")
    logged = "".join(path.read_text() for path in (work / "logs").glob("*.log"))
    execution = max((float(value) for value in EXECUTION.findall(logged)), default=0.0)
    return seconds, execution, len(load_tasks(data, split="test"))


def lm_eval_run(model: Path, data: Path, base_url: str, work: Path, concurrency: int) -> float:
    """One `lm_eval --model local-chat-completions` process over the same conversations: its wall time."""
    name = "behaviorbench_chat"
    eos = load_tokenizer(str(model)).eos_token
    work.mkdir(parents=True)
    with (work / "docs.jsonl").open("w") as handle:
        for messages in load_tasks(data, split="test")["messages"]:
            text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)
            handle.write(json.dumps({"prompt": text}) + "\n")
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(work / "docs.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "",
        # An empty stop list is refused by `transformers serve` (HTTP 400); the model's end of turn stops both clients.
        "generation_kwargs": {"until": [eos], "max_gen_toks": MAX_TOKENS, "do_sample": False, "temperature": 0.0},
        "metric_list": [{"metric": "exact_match"}],
    }
    (work / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    args = f"model={model},base_url={base_url}/chat/completions,num_concurrent={concurrency},max_retries=3"
    command = [lm_eval_binary(), "--model", "local-chat-completions", "--model_args", args, "--apply_chat_template"]
    command += ["--include_path", str(work), "--tasks", name, "--output_path", str(work / "out")]
    began = time.perf_counter()
    with (work / "lm_eval.log").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}).returncode
    if code:
        raise SystemExit(f"lm_eval exited {code}; see {work / 'lm_eval.log'}")
    return time.perf_counter() - began


def section(work: Path, concurrency: int = 8) -> str:
    """The comparison as Markdown."""
    work.mkdir(parents=True, exist_ok=True)
    data = write_sample(work / "data", tasks=3000, seed=1)
    model = make_tiny(data, work / "tiny")
    port = free_port()
    server = serve(model, port)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        peer = lm_eval_run(model, data, base_url, work / "lm_eval", concurrency)
        seconds, execution, n = harness_run(model, data, base_url, work / "harness", concurrency)
    finally:
        server.kill()
    return (
        "| work | lm-evaluation-harness `local-chat-completions` | `harness eval`, endpoint agent | ratio |\n"
        "|---|---|---|---|\n"
        f"| {n} tasks, `transformers serve` (tiny model, CPU), {concurrency} concurrent requests, {MAX_TOKENS} tokens "
        f"| {peer:.1f} s, {n / peer:.1f} tasks/s | {seconds:.1f} s, {n / seconds:.1f} tasks/s "
        f"(Ray Data {execution:.1f} s) | {peer / seconds:.2f}x |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    print(section(Path(tempfile.mkdtemp(prefix="endpoint-compare-")), args.concurrency))


if __name__ == "__main__":
    main()
