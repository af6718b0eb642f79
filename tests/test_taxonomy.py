from pathlib import Path

import pytest

from harness.core.errors import ConfigError
from harness.data.taxonomy import load_taxonomy


def test_default_taxonomy_has_13_categories_across_the_spectrum():
    taxonomy = load_taxonomy()
    assert len(taxonomy.categories) == 13
    assert set(taxonomy.task_types) == {"reactive", "proactive", "restraint"}
    assert taxonomy.behaviors == ("reactive", "proactive")
    assert taxonomy.behavior_of_category("risk_identification") == "proactive"
    assert taxonomy.behavior_of_category("no_intervention_resolved") == "reactive"
    by_type = {t: sum(c.task_type == t for c in taxonomy.categories.values()) for t in taxonomy.task_types}
    assert by_type == {"reactive": 5, "proactive": 5, "restraint": 3}


def test_categories_named_by_the_paper_carry_its_full_name():
    taxonomy = load_taxonomy()
    paper = {
        name: spec.description.removeprefix("Paper: ").split(". ")[0]
        for name, spec in taxonomy.categories.items()
        if spec.description.startswith("Paper: ")
    }
    assert paper == {
        "ddx_reasoning": "Differential Diagnosis (DDX) Reasoning",
        "temporal_ordering": "Temporal Ordering",
        "omission_detection": "Omission Detection in Group Decision-Makings",
        "consistency_check": "Consistency Check",
        "error_correction": "Error Correction",
    }
    assert {taxonomy.category(name).task_type for name in paper} == {"reactive", "proactive"}


@pytest.mark.parametrize("granularity, n", [("behavior", 2), ("task_type", 3), ("category", 13)])
def test_labels_map_back_to_behaviors(granularity, n):
    taxonomy = load_taxonomy()
    labels = taxonomy.labels(granularity)
    assert len(labels) == n
    for name, spec in taxonomy.categories.items():
        label = taxonomy.label_of(granularity, name, spec.behaviors[0])
        assert label in labels
        assert taxonomy.behavior_of_label(granularity, label) == spec.behaviors[0]


def test_taxonomy_is_replaceable_by_a_file(tmp_path: Path):
    path = tmp_path / "release.yaml"
    path.write_text(
        "behaviors: {silent: x, speak_up: y}\n"
        "task_types: {ask: {behavior: silent}, flag: {behavior: speak_up}}\n"
        "categories: {QA: {type: ask}, Omission: {type: flag}}\n"
    )
    taxonomy = load_taxonomy(path)
    assert taxonomy.behavior_of_category("Omission") == "speak_up"
    assert taxonomy.labels("category") == ("QA", "Omission")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("behaviors: {a: x}\ntask_types: {t: {behavior: b}}\ncategories: {c: {type: t}}\n", "task_types.t.behavior"),
        ("behaviors: {a: x}\ntask_types: {t: {behavior: a}}\ncategories: {c: {type: u}}\n", "categories.c.type"),
        ("behaviors: {a: x}\ntask_types: {t: {behavior: a}}\ncategories: {c: {type: t}}\nextra: 1\n", "extra"),
        ("behaviors: [\n", "cannot read"),
        (
            "behaviors: {a: x}\ntask_types: {t: {behavior: a}}\ncategories: {c: {type: t, behaviors: a}}\n",
            "categories.c.behaviors: expected a list, got 'a'",
        ),
    ],
)
def test_bad_taxonomy_names_the_key(tmp_path: Path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml") as info:
        load_taxonomy(path)
    assert needle in str(info.value)
