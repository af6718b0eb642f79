import itertools

import pytest
import torch

from harness.agents.encoding import encode_prompt
from harness.agents.loading import load_model, load_tokenizer
from harness.agents.scoring import generate_answers, label_scores
from harness.agents.selection import Mode, Selector, Strategy
from harness.agents.tokens import GRANULARITIES, INITS, PLACEMENTS, SPELLINGS, TokenDesign
from harness.data.io import load_tasks
from harness.data.taxonomy import load_taxonomy

DESIGNS = [TokenDesign(*combo) for combo in itertools.product(GRANULARITIES, SPELLINGS, PLACEMENTS, INITS)]


@pytest.fixture(scope="module")
def taxonomy():
    return load_taxonomy()


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: d.name)
def test_design_round_trip_format_tokenize_parse(design, tiny_model, taxonomy):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model))
    design.apply(tokenizer, model, taxonomy)
    ids = design.label_token_ids(tokenizer, taxonomy)
    assert len({tuple(i) for i in ids}) == len(ids), "labels must tokenize differently"
    if design.spelling == "special":
        assert all(len(i) == 1 for i in ids)
    for label in taxonomy.labels(design.granularity):
        target = design.target(label, "The latest potassium is 4.1 mmol/L.")
        decoded = tokenizer.decode(tokenizer(target, add_special_tokens=False)["input_ids"])
        assert design.parse(decoded, taxonomy) == label
        behavior = taxonomy.behavior_of_label(design.granularity, label)
        assert behavior in taxonomy.behaviors
    assert design.parse("no token here", taxonomy) is None
    assert ("Begin every answer" in design.system_note(taxonomy)) == (design.placement == "system")


def test_apply_adds_rows_once_and_initialises_them(tiny_model, taxonomy):
    for init in INITS:
        tokenizer = load_tokenizer(str(tiny_model))
        model = load_model(str(tiny_model))
        old = model.get_input_embeddings().weight.detach().clone()
        design = TokenDesign(init=init)
        new = design.apply(tokenizer, model, taxonomy)
        assert new == [old.shape[0], old.shape[0] + 1]
        rows = model.get_input_embeddings().weight.detach()[new]
        if init == "mean":
            torch.testing.assert_close(rows[0], old.mean(0))
        elif init == "phrase":
            assert not torch.allclose(rows[0], rows[1])  # the two phrases differ
        else:
            assert rows.std() > 0.5 * old.std()
        assert design.apply(tokenizer, model, taxonomy) == []  # idempotent
    text = TokenDesign(spelling="text")
    assert text.apply(load_tokenizer(str(tiny_model)), load_model(str(tiny_model)), taxonomy) == []


def test_label_scores_single_and_multi_token_agree_with_a_direct_forward(tiny_model, taxonomy):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model)).eval()
    prompts = [tokenizer("Dr. Reyes: what is the potassium?")["input_ids"], tokenizer("Patient: hi")["input_ids"]]
    labels = TokenDesign(spelling="text").label_token_ids(tokenizer, taxonomy)
    scores = label_scores(model, prompts, labels, tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        for column, label in enumerate(labels):
            ids = torch.tensor([prompt + label])
            logprobs = model(input_ids=ids).logits.log_softmax(-1)[0]
            expected = sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(label))
            assert scores[row, column].item() == pytest.approx(expected, abs=1e-4)


def test_a_behavior_token_agent_answers_after_the_label_it_chose(tiny_model, sample):
    """Behavior first, then the answer: generated after the chosen label's token, which opens the answer."""
    tokenizer, model, design, taxonomy = (
        load_tokenizer(str(tiny_model)),
        load_model(str(tiny_model)).eval(),
        TokenDesign(),
        load_taxonomy(),
    )
    design.apply(tokenizer, model, taxonomy)
    selector = Selector(model, tokenizer, taxonomy, Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, design, True, 5)
    prompts = [
        encode_prompt(tokenizer, selector.prompt(list(m)), 512) for m in load_tasks(sample, split="test").messages[:4]
    ]
    selections = selector.select(prompts)
    ids = dict(zip(selector.labels, selector.label_ids, strict=True))
    after = generate_answers(model, tokenizer, [p + ids[s.label] for p, s in zip(prompts, selections, strict=True)], 5)
    for chosen, rest in zip(selections, after, strict=True):
        assert chosen.answer == tokenizer.decode(ids[chosen.label]) + rest
        assert design.parse(chosen.answer, taxonomy) == chosen.label
