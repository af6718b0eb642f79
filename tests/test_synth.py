import re
from collections import defaultdict
from datetime import datetime

import pytest

from harness.agents.scoring import classify_answer
from harness.data.mini import BUILDERS, generate
from harness.data.records import TaskRecord
from harness.data.taxonomy import load_taxonomy

EVENT = re.compile(r"(?:^|; )([^;]+?) \((\d+ \w+), (\d\d:\d\d)\)")


@pytest.fixture(scope="module")
def tasks() -> list[TaskRecord]:
    return generate(3000, seed=0)


def test_every_category_of_the_taxonomy_has_a_builder():
    assert set(BUILDERS) == set(load_taxonomy().categories)


def test_every_split_has_all_13_categories(tasks: list[TaskRecord]):
    categories = defaultdict(set)
    for task in tasks:
        categories[task.split].add(task.category)
    assert {split: len(names) for split, names in categories.items()} == {"train": 13, "dev": 13, "test": 13}


def test_references_select_their_gold_behavior_by_the_answer_rule(tasks: list[TaskRecord]):
    wrong = [(t.category, t.reference) for t in tasks if classify_answer(t.reference or "") != t.gold_behavior]
    assert wrong == []


def test_temporal_ordering_puts_the_events_mentioned_out_of_order_in_time_order(tasks: list[TaskRecord]):
    timeline = [t for t in tasks if t.category == "temporal_ordering"]
    assert len(timeline) > 150 and any(t.hard for t in timeline)
    for task in timeline:
        events = EVENT.findall((task.reference or "").removeprefix("In order: "))
        assert [name for name, _, _ in events[:2]] == ["symptom onset", "admission"], task.reference
        times = [datetime.strptime(f"{day} 2001 {clock}", "%d %B %Y %H:%M") for _, day, clock in events]
        assert len(set(times)) == len(times) >= 4 and times == sorted(times), task.reference
        turns = [m["content"] for m in task.messages]
        stated = [
            next(i for i, turn in enumerate(turns) if f" on {day} at {clock}." in turn) for _, day, clock in events
        ]
        assert stated != sorted(stated), turns
