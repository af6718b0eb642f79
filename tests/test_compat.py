"""Files written before the package was grouped by concern (commit 9a13d09, 2026-12-04) still read: a leaderboard whose
slices were names, predictions whose scores were JSON text, and a finished run whose saved config lacks the keys
added since. `tests/data/v1/` holds such files from a `make demo` of that commit."""

import json
import shutil
from pathlib import Path

import pandas as pd
import yaml

from harness.core import config
from harness.core.storage import location
from harness.results import leaderboard, predictions
from harness.results.metrics import score
from harness.train.config import TrainConfig
from harness.train.driver import train
from harness.train.layout import trained_model

V1 = Path(__file__).parent / "data" / "v1"
OLD_PREDICTIONS = V1 / "behaviorsft-a05e00cab93e.parquet"


def test_an_old_leaderboard_reads_with_typed_slices_and_ranks_as_it_did():
    frame = leaderboard.read(V1 / "leaderboard.parquet")
    assert list(frame.columns) == leaderboard.COLUMNS
    assert set(frame.slice_kind) == {"overall", "task_type", "category", "versus"}
    versus = frame[frame.slice_kind == "versus"]
    assert set(versus.slice_value) == {"behaviorsft", "sft", "instructed", "zero-shot"}
    ranking = leaderboard.ranking(frame)
    added = ["readout", "caught", "vague_or_wrong", "grader"]  # columns added since: unknown for rows before them
    assert set(ranking.readout) == set(ranking.grader) == {""}
    assert ranking.caught.isna().all() and ranking.vague_or_wrong.isna().all()
    # The demo's export of that commit, byte for byte, but for the added columns.
    assert leaderboard.render(ranking.drop(columns=added), "md") == (V1 / "leaderboard.md").read_text()


def test_appending_to_an_old_leaderboard_keeps_its_rows_typed(tmp_path: Path):
    board = tmp_path / "leaderboard.parquet"
    shutil.copy(V1 / "leaderboard.parquet", board)
    old = leaderboard.read(board)
    new = old[old.agent == "sft"].assign(run_id="new-run", agent="sft-2")
    leaderboard.append(board, new)
    again = leaderboard.read(board)
    assert len(again) == len(old) + len(new) and "slice" not in pd.read_parquet(board).columns
    assert leaderboard.ranking(again[again.agent != "sft-2"]).equals(leaderboard.ranking(old))


def test_old_predictions_read_with_typed_scores_and_score_the_same():
    old = pd.read_parquet(OLD_PREDICTIONS)
    assert old.scores.map(lambda v: isinstance(v, str)).all()  # JSON text, as that commit wrote it
    read = predictions.read(location(OLD_PREDICTIONS, "predictions"))
    for text, typed in zip(old.scores, read.scores, strict=True):
        assert predictions.score_map(typed) == json.loads(text)
    assert score(read, samples=0).equals(score(old, samples=0))


def test_an_old_part_and_a_new_one_finalize_into_one_typed_file(tmp_path: Path):
    store = predictions.PredictionStore(location(tmp_path, "output_dir"), "behaviorsft-a05e00cab93e")
    old = pd.read_parquet(OLD_PREDICTIONS)
    Path(store.parts_dir.path).mkdir(parents=True)
    old.iloc[:4].to_parquet(Path(store.parts_dir.path) / "part-old.parquet", index=False)  # a killed old job's part
    store.add(predictions.read(location(OLD_PREDICTIONS, "predictions")).iloc[4:])
    store.finalize(set(old.task_id))
    final = pd.read_parquet(store.final.path)
    assert len(final) == len(old) and not final.scores.map(lambda v: isinstance(v, str)).any()


def test_an_old_finished_run_is_reused_and_its_model_resolves(tmp_path: Path, tiny_model: Path, sample: Path):
    runs = tmp_path / "runs"
    run = runs / "behaviorsft-tiny"
    shutil.copytree(tiny_model, run / "final")
    shutil.copy(V1 / "final_metrics.json", run / "final_metrics.json")
    saved = yaml.safe_load((V1 / "train_config.yaml").read_text())
    assert "address" not in saved  # a key added since: its default is what the old run ran with
    saved.update(data=str(sample), storage_path=str(runs), model={**saved["model"], "name_or_path": str(tiny_model)})
    (run / "train_config.yaml").write_text(yaml.safe_dump(saved))
    values = {k: v for k, v in saved.items() if k != "tracking"}
    result = train(config.build(TrainConfig, values))  # finished: no Ray, no training
    assert result.metrics == json.loads((V1 / "final_metrics.json").read_text())
    assert trained_model("run:behaviorsft-tiny", runs) == str(run / "final")
