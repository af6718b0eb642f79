"""Benchmarks, measured side by side in one run; results as a Markdown table.

    python -m benchmarks.run [--out benchmarks/results.md] [--doc docs/benchmarks.md] [--sizes 1000,10000,215000]
                             [--smollm2]

1. Evaluation throughput (tasks/s) of the harness (Ray Data, behavior-token scoring) at 1 and 2
   replicas, against a plain sequential transformers loop doing the same scoring on the same model
   and tasks, and against generation-based scoring (greedy answers + the answer rule).
2. Training throughput (tokens/s) of Ray Train + DeepSpeed against a plain single-process PyTorch
   loop on the same model and examples.
3. Evaluation time and peak memory (driver + Ray workers) as the streamed rows and agents grow.
4. lm-evaluation-harness itself against `harness eval` (benchmarks/lm_eval_compare.py; the `bench` extra), in this
   driver and as whole processes, cold and on a running cluster (benchmarks/whole_process.py).
5. An endpoint agent against lm-eval's `local-chat-completions` on one `transformers serve`
   (benchmarks/endpoint_compare.py).
6. With `--smollm2`: what a SmolLM2 training epoch costs, LoRA on every layer against the top layers with the frozen
   ones cached (benchmarks/train_cost.py), and SmolLM2's decisions read through llama.cpp's top_logprobs against
   the hf agent's (benchmarks/llama_cpp_agreement.py; the `llamacpp` extra).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import endpoint_compare, llama_cpp_agreement, lm_eval_compare, train_cost, whole_process
from benchmarks.memory import PeakMemory
from harness.agents.encoding import encode, encode_example
from harness.agents.loading import load_model, load_tokenizer
from harness.agents.making import add_behavior_tokens, make_tiny
from harness.agents.prompts import target
from harness.agents.references import local_or_hub
from harness.agents.scoring import label_scores
from harness.agents.selection import Mode, Strategy, agent_prompt
from harness.agents.tokens import TokenDesign
from harness.core.config import build
from harness.core.files import write_text
from harness.data.io import load_tasks
from harness.data.mini import write_sample
from harness.data.taxonomy import load_taxonomy
from harness.evaluate.config import EvalConfig
from harness.evaluate.driver import evaluate
from harness.train.config import TrainConfig
from harness.train.data import pad_batch
from harness.train.driver import train


def plain_eval(model_dir: Path, data: Path, split: str, batch_size: int = 16) -> tuple[float, int]:
    """The same behavior-token scoring as the harness, as one sequential loop without Ray."""
    taxonomy, design = load_taxonomy(), TokenDesign()
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir)).eval()
    frame = load_tasks(data, split=split)
    began = time.perf_counter()
    labels = design.label_token_ids(tokenizer, taxonomy)
    prompts = [
        encode(tokenizer, agent_prompt(tokenizer, list(m), Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, design, taxonomy))
        for m in frame["messages"]
    ]
    for start in range(0, len(prompts), batch_size):
        label_scores(model, prompts[start : start + batch_size], labels, tokenizer.pad_token_id)
    return time.perf_counter() - began, len(prompts)


def harness_eval(
    model_dir: Path,
    data: Path,
    work: Path,
    name: str,
    mode: str,
    replicas: int = 1,
    agents: int = 1,
    split: str = "test",
) -> tuple[float, int]:
    specs = [
        {
            "name": f"{name}-{i}",
            "model": str(model_dir),
            "mode": mode,
            "replicas": replicas,
            "num_cpus": 2 / (replicas * agents),
        }
        for i in range(agents)
    ]
    cfg = build(
        EvalConfig,
        {
            "data": str(data),
            "split": split,
            "answers": False,
            "max_new_tokens": 16,
            "bootstrap": 0,
            "output_dir": str(work / name),
            "agents": specs,
        },
    )
    began = time.perf_counter()
    table = evaluate(cfg).metrics
    return time.perf_counter() - began, int(table[(table.slice_kind == "overall") & (table.subset == "all")].n.iloc[0])


def plain_train(model_dir: Path, data: Path, steps: int, batch_size: int = 16) -> float:
    """Tokens/s of a single-process AdamW loop over the same BehaviorSFT examples."""
    import torch

    taxonomy, design = load_taxonomy(), TokenDesign()
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    design.apply(tokenizer, model, taxonomy)
    frame = load_tasks(data, split="train").head(steps * batch_size)
    examples = [
        encode_example(
            tokenizer,
            agent_prompt(tokenizer, list(r["messages"]), Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, design, taxonomy),
            target(tokenizer, r, design, taxonomy),
            384,
        )
        for r in frame.to_dict("records")
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.set_num_threads(2)
    tokens, began = 0, time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], tokenizer.pad_token_id)
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - began)


DOC_BLOCK = ("<!-- make bench: begin -->", "<!-- make bench: end -->")


def into_doc(doc: Path, text: str) -> None:
    """Put `text` between the document's `DOC_BLOCK` markers, in place of what the last run put there."""
    begin, end = DOC_BLOCK
    before, rest = doc.read_text().split(begin, 1)
    after = rest.split(end, 1)[1]
    write_text(doc, f"{before}{begin}\n{text}\n{end}{after}")


def provenance(seconds: float) -> str:
    """Where and when these numbers were taken."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (
        f"Measured by `make bench` in {seconds / 60:.0f} min on {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}, at commit {commit or 'unknown'}; compare ratios within one run."
    )


def main() -> None:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results.md")
    # 215,000 synthetic tasks hold about 150,000 train rows: the real benchmark's size (142,496 tasks).
    parser.add_argument("--sizes", default="1000,10000,215000", help="tasks synthesized for the scaling benchmark")
    parser.add_argument("--smollm2", action="store_true", help="also compare with lm-eval on SmolLM2-135M")
    parser.add_argument(
        "--doc", default="docs/benchmarks.md", help="the document whose marked block gets the results too ('' for none)"
    )
    args = parser.parse_args()
    lm_eval_compare.lm_eval_binary()  # missing: refused now, not after the other benchmarks
    if args.doc and not all(marker in Path(args.doc).read_text() for marker in DOC_BLOCK):
        raise SystemExit(f"{args.doc}: no {' ... '.join(DOC_BLOCK)} block for the results (or pass --doc '')")
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    # Whole processes first, before this driver starts its own Ray: each command starts (or joins) its own.
    processes = whole_process.section(work / "whole-process")
    endpoint = endpoint_compare.section(work / "endpoint")
    cost = train_cost.section(work / "train-cost", local_or_hub("smollm2", "--smollm2")) if args.smollm2 else ""
    agreement = llama_cpp_agreement.section(work / "llama-cpp") if args.smollm2 else ""
    import ray

    ray.init(runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # First, in a driver that has run nothing else, as `harness eval` runs. (Run last, its harness times were 1.3x
    # to 1.6x a standalone run's; the uncompiled bench extra, since compiled by the Makefile, explains at least most
    # of that: see docs/benchmarks.md, "Why `make bench` used to miss them".)
    compared = lm_eval_compare.section(work / "lm-eval", smollm2=args.smollm2)
    data = write_sample(work / "data", tasks=3000, seed=0)
    tiny = make_tiny(data, work / "tiny")
    bsft = add_behavior_tokens(tiny, work / "bsft", TokenDesign(), load_taxonomy())  # throughput needs no training
    rows: list[tuple[str, str, str]] = []

    plain_s, n = plain_eval(bsft, data, "test")
    rows.append(("eval: plain sequential loop, behavior-token scoring", f"{n / plain_s:.1f} tasks/s", "1.00x"))
    for scoring, model, mode in (
        ("behavior-token scoring", bsft, "behaviorsft"),
        ("generation-based scoring (16 tokens)", tiny, "zero_shot"),
    ):
        for replicas in (1, 2):
            seconds, n = harness_eval(model, data, work, f"{mode}-r{replicas}", mode, replicas)
            rows.append(
                (
                    f"eval: harness, {scoring}, {replicas} replica(s)",
                    f"{n / seconds:.1f} tasks/s",
                    f"{plain_s / seconds:.2f}x",
                )
            )

    plain_tps = plain_train(tiny, data, steps=40)
    rows.append(("train: plain single-process PyTorch loop (2 threads)", f"{plain_tps:.0f} tokens/s", "1.00x"))
    for workers in (1, 2):
        cfg = build(
            TrainConfig,
            {
                "run_name": f"bench-{workers}",
                "data": str(data),
                "model": {"name_or_path": str(tiny)},
                "storage_path": str(work / "runs"),
                "epochs": 1,
                "batch_size": 16,
                "max_length": 384,
                "max_train_tasks": 40 * 16,
                "eval_max_tasks": 16,
                "log_every": 10,
                "num_workers": workers,
                "resources_per_worker": {"CPU": 2 // workers},
                "max_failures": 0,
            },
        )
        began = time.perf_counter()
        metrics = train(cfg).metrics
        wall = time.perf_counter() - began
        rows.append(
            (
                f"train: Ray Train + DeepSpeed ZeRO-2, {workers} worker(s) (steady state; run wall {wall:.0f}s)",
                f"{metrics['tokens_per_s']:.0f} tokens/s",
                f"{metrics['tokens_per_s'] / plain_tps:.2f}x",
            )
        )

    def scaling(label: str, data_path: Path, name: str, agents: int = 1, split: str = "test") -> None:
        with PeakMemory() as memory:
            seconds, n = harness_eval(bsft, data_path, work, name, "behaviorsft", agents=agents, split=split)
        rows.append(
            (
                label.format(n=n),
                f"{seconds:.1f} s, peak {memory.peak / 2**30:.2f} GiB",
                f"{agents * n / seconds:.1f} tasks/s",
            )
        )

    for size in [int(s) for s in args.sizes.split(",")]:
        scaled = write_sample(work / f"data-{size}", tasks=size, seed=1)
        scaling("scaling: {n} rows streamed, 1 agent", scaled, f"scale-{size}", split="train")
    for agents in (1, 2, 4):
        scaling(f"scaling: {agents} agent(s) x {{n}} tasks", data, f"agents-{agents}", agents=agents)

    lines = [
        provenance(time.perf_counter() - started),
        "",
        "#### Against lm-evaluation-harness, whole processes",
        "",
        processes,
        "",
        "#### Against lm-evaluation-harness, in one driver",
        "",
        compared,
        "",
        "#### An endpoint agent against lm-evaluation-harness's `local-chat-completions`",
        "",
        endpoint,
        "",
        *(["#### Training cost", "", cost, ""] if cost else []),
        *(["#### Decisions through llama.cpp's top_logprobs", "", agreement, ""] if agreement else []),
        "#### Throughput against plain loops, and scaling",
        "",
        "| benchmark | result | ratio |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
    ]
    text = "\n".join(lines)
    write_text(Path(args.out), text + "\n")
    if args.doc:
        into_doc(Path(args.doc), text)
    print(text)


if __name__ == "__main__":
    main()
