import re
import shutil
import struct
import subprocess
import sys
import zlib
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness.cli.main import run
from harness.core.files import write_parquet
from harness.data.io import fingerprint, load_tasks
from harness.data.mini import write_sample
from harness.results import leaderboard, report
from harness.results.charts import PALETTE
from harness.results.metrics import score_agents
from harness.results.predictions import COLUMNS, scores_column

ROOT = Path(__file__).parents[1]
AGENTS = {"behaviorsft": 0.95, "sft": 0.85, "zero-shot": 0.5}  # agent: share of tasks it gets right
OLD = "2000-01-01T00:00:00+00:00"


def _predictions(tasks: pd.DataFrame, agent: str, accuracy: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    gold = tasks["gold_behavior"].to_numpy()
    other = np.where(gold == "proactive", "reactive", "proactive")
    pred = np.where(rng.random(len(tasks)) < accuracy, gold, other)
    unchosen = np.where(pred == "proactive", "reactive", "proactive")
    return tasks.assign(
        agent=agent,
        strategy="behavior_token",
        pred_behavior=pred,
        pred_label=pred,
        scores=[scores_column([p, o], [-0.2, -1.7]) for p, o in zip(pred, unchosen, strict=True)],
        answer=f"<script>alert('{agent}')</script> Noted & done.",
        latency_ms=12.5,
        prompt="<|im_start|>user\n...<|im_end|>",
        prompt_tokens=240,
        chat_template_sha256="0" * 64,
        readout="logprobs",
    )[list(COLUMNS)]


def _metadata(rows: pd.DataFrame, agent: str, run_id: str, dataset: str) -> pd.DataFrame:
    return leaderboard.with_metadata(
        rows,
        run_id=run_id,
        agent=agent,
        model="m",
        mode="behaviorsft",
        design="",
        readout="logprobs",
        dataset=dataset,
        split="test",
    )


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict[str, Path]:
    """A finished evaluation of three agents, as `harness eval` leaves it: data, predictions, leaderboard.

    The leaderboard also holds an older run of `sft` whose predictions are gone: the report must skip it."""
    root = tmp_path_factory.mktemp("evaluation")
    data = write_sample(root / "data", tasks=600, seed=5)
    tasks = load_tasks(data, split="test")
    predictions = {agent: _predictions(tasks, agent, share, seed) for seed, (agent, share) in enumerate(AGENTS.items())}
    for agent, frame in predictions.items():
        write_parquet(root / "eval" / f"{agent}-run-{agent}.parquet", frame)
    proactive = sorted(tasks[tasks.task_type == "proactive"].task_id)[:4]
    grades = pd.DataFrame({"task_id": proactive, "grader": "evidence", "grade": ["none", "vague", "caught", "wrong"]})
    write_parquet(root / "eval" / "behaviorsft-run-behaviorsft" / "grades.parquet", grades)
    scored = score_agents(predictions, samples=200)
    board = root / "leaderboard.parquet"
    dataset = fingerprint(data)
    leaderboard.append(board, _metadata(scored["sft"], "sft", "old-sft", dataset).assign(timestamp=OLD))
    leaderboard.append(board, pd.concat(_metadata(scored[a], a, f"run-{a}", dataset) for a in AGENTS))
    return {"data": data, "eval": root / "eval", "board": board}


def _report_args(evaluation: dict[str, Path], out: Path, *extra: str) -> list[str]:
    inputs = ["--leaderboard", evaluation["board"], "--predictions", evaluation["eval"], "--data", evaluation["data"]]
    return ["report", *map(str, inputs), "--out", str(out), *extra]


def png_pixels(path: Path) -> np.ndarray:
    """The pixels [height, width, channels] of an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes)."""
    data, pos, chunks = path.read_bytes(), 8, {}
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8 : pos + 8 + size]
        pos += 12 + size
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert depth == 8 and colour in (2, 6) and not interlace
    channels = 3 if colour == 2 else 4
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, 1 + width * channels)
    out = np.zeros((height + 1, width * channels), np.int32)  # row 0: the zero row above the image
    for y, (kind, raw) in enumerate(zip(rows[:, 0], rows[:, 1:].astype(np.int32), strict=True), start=1):
        up = out[y - 1]
        if kind in (0, 2):
            out[y] = (raw + (up if kind == 2 else 0)) & 255
        elif kind == 1:
            out[y] = np.cumsum(raw.reshape(width, channels), axis=0).ravel() & 255
        else:
            line = [0] * channels + raw.tolist()
            above = [0] * channels + up.tolist()
            for i in range(channels, len(line)):
                a, b, c = line[i - channels], above[i], above[i - channels]
                if kind == 3:
                    line[i] = (line[i] + (a + b) // 2) & 255
                else:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            out[y] = line[channels:]
    return out[1:].reshape(height, width, channels)[..., :3].astype(np.uint8)


def _mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], np.uint8)
    return (pixels == rgb).all(-1)


def test_report_renders_in_a_real_browser(evaluation, tmp_path: Path):
    chromium = shutil.which("chromium")
    assert chromium, "Chromium is missing: run `make browser`"
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "harness.cli", *_report_args(evaluation, out)], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"<script|<link|<img|\b(src|href)=|url\(", page)  # self-contained: nothing to fetch
    screenshot = tmp_path / "page.png"
    browser = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    browser += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    browser += [f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={screenshot}", "--window-size=1300,1300"]
    shown = subprocess.run([*browser, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout

    loaded = report.load(evaluation["board"], evaluation["eval"], evaluation["data"])
    ranking = re.search(r'<table id="ranking">.*?</table>', dom, re.S).group(0)
    assert re.findall(r'<td class="name">([^<]*)</td>', ranking) == list(AGENTS)  # best first
    assert ranking.count("<tr>") == 1 + len(AGENTS)
    assert dom.count("<rect") == len(report.category_shares(loaded)) + len(AGENTS)  # bars and legend swatches
    assert len(report.category_shares(loaded)) == 13 * len(AGENTS)
    disagreeing = report.disagreements(loaded)
    assert 0 < len(disagreeing) < len(loaded.tasks)
    assert dom.count("<details") == 2 + len(disagreeing)  # column help, prediction files, one per task
    assert "&lt;script&gt;alert('sft')&lt;/script&gt; Noted &amp; done." in dom and "<script" not in dom

    pixels = png_pixels(screenshot)
    for colour in PALETTE[: len(AGENTS)]:  # each agent's bars: far more than its legend swatch
        assert _mask(pixels, colour).sum() > 2000, colour
    header = _mask(pixels, report.RANKING_HEADER)
    assert header.sum() > 10_000
    rows, columns = np.nonzero(header)
    below = pixels[rows.max() + 1 : rows.max() + 60, columns.min() : columns.max()]
    assert (below.max(-1) < 100).sum() > 500  # the ranking's body rows: dark text under the header
    for colour in report.SIGNIFICANT.values():  # the paired matrix's significantly better and worse cells
        assert _mask(pixels, colour).sum() > 1000, colour


def test_report_shows_an_example_of_each_content_grade_beside_the_reference(evaluation, tmp_path: Path):
    out = tmp_path / "report.html"
    run(_report_args(evaluation, out))
    page = out.read_text()
    section = page.split("<h2>What the interventions said</h2>")[1].split("<h2>")[0]
    assert "behaviorsft <small>graded by evidence</small>" in section
    assert "<h3>sft" not in section and "<h3>zero-shot" not in section  # only the agents that were graded
    tasks = load_tasks(evaluation["data"], split="test").set_index("task_id")
    proactive = sorted(tasks[tasks.task_type == "proactive"].index)[:4]
    rows = re.findall(r"<tr><td>(\w+)</td><td>([^<]*)</td>", section)
    assert rows == [("caught", proactive[2]), ("wrong", proactive[3]), ("vague", proactive[1]), ("none", proactive[0])]
    reference = tasks.loc[proactive[2], "reference"]
    assert html_escape(reference) in section


def test_report_caps_the_samples_and_uses_each_agents_latest_run(evaluation, tmp_path: Path, capsys):
    out = tmp_path / "report.html"
    assert run(_report_args(evaluation, out, "--max-samples", "5")) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out} (3 agents)")
    page = out.read_text(encoding="utf-8")
    n = len(report.disagreements(report.load(evaluation["board"], evaluation["eval"], evaluation["data"])))
    assert (
        f"The agents chose different behaviors on {n} of {len(load_tasks(evaluation['data'], split='test'))} tasks."
        in page
    )
    assert f"The first 5 by task id are shown; {n - 5} more are left out." in page
    assert page.count("<details><summary><b>") == 5
    assert "sft-run-sft.parquet" in page and "old-sft" not in page
    paired = re.search(r'<table id="paired">.*?</table>', page, re.S).group(0)
    assert paired.count('class="sig-better"') >= 2 and paired.count('class="sig-worse"') >= 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_refuses_missing_or_corrupt_inputs(evaluation, tmp_path: Path, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(evaluation["eval"], corrupt)
    broken = corrupt / "sft-run-sft.parquet"
    broken.write_bytes(broken.read_bytes()[:200])
    other_data = write_sample(tmp_path / "other", tasks=50, seed=1)
    predictions = next(evaluation["eval"].glob("*.parquet"))
    cases = [
        (["--leaderboard", tmp_path / "none.parquet"], tmp_path / "none.parquet", "no leaderboard yet"),
        (["--leaderboard", predictions], predictions, "not a leaderboard (a predictions file?"),
        (["--dataset", "none"], evaluation["board"], "no runs on dataset none"),
        (["--predictions", tmp_path], tmp_path / "behaviorsft-run-behaviorsft.parquet", "no such predictions file"),
        (["--predictions", corrupt], broken, "not a readable Parquet file"),
        (["--data", other_data], other_data, "is not the ranked runs' dataset"),
        (["--data", tmp_path / "none.jsonl"], tmp_path / "none.jsonl", "no such file or directory"),
    ]
    for extra, path, message in cases:
        assert run(_report_args(evaluation, tmp_path / "report.html", *map(str, extra))) == 1, extra
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "report.html").exists()
