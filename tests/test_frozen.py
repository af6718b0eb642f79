"""The frozen lower layers, run once per task and kept (`cache_frozen_layers`), give the same training as the
whole model: the same losses step by step, and the same dev selections."""

import pytest
import torch

from harness.agents.encoding import encode_example, encode_prompt
from harness.agents.loading import load_model, load_tokenizer
from harness.agents.prompts import target
from harness.agents.selection import Mode, Selector, Strategy, agent_prompt
from harness.agents.tokens import TokenDesign
from harness.data.io import load_tasks
from harness.data.taxonomy import load_taxonomy
from harness.train.config import LoraSettings
from harness.train.data import pad_batch
from harness.train.frozen import FrozenLayers, answer_loss
from harness.train.recipe import weighted_loss, wrap_lora

TAXONOMY, DESIGN = load_taxonomy(), TokenDesign()


def _setup(tiny_model, sample):
    torch.manual_seed(0)
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    DESIGN.apply(tokenizer, model, TAXONOMY)
    lora = LoraSettings(enabled=True, r=4, alpha=8, layers=1, train_new_tokens=False)
    model = wrap_lora(model, lora, [])
    frame = load_tasks(sample, split="train").head(12)
    examples, prompts = [], []
    for row in frame.to_dict("records"):
        prompt = agent_prompt(
            tokenizer, list(row["messages"]), Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, DESIGN, TAXONOMY
        )
        examples.append(encode_example(tokenizer, prompt, target(tokenizer, row, DESIGN, TAXONOMY), 512))
        prompts.append(encode_prompt(tokenizer, prompt, 512))
    return tokenizer, model, examples, prompts, list(frame.task_id)


def test_training_through_the_kept_layers_is_the_whole_models_training(tiny_model, sample):
    losses = {}
    for kept in (False, True):
        tokenizer, model, examples, _, ids = _setup(tiny_model, sample)
        frozen = FrozenLayers(model, model.config.num_hidden_layers - 1) if kept else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        losses[kept] = []
        for step in range(4):  # the same 6 tasks every other step: the second time from the kept states
            rows = slice(0, 6) if step % 2 == 0 else slice(6, 12)
            batch = pad_batch(examples[rows], tokenizer.pad_token_id)
            if frozen is not None:
                loss = frozen.loss(batch, ids[rows], 3.0)
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = weighted_loss(logits, batch["labels"], 3.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[kept].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][0] != pytest.approx(losses[True][2], rel=1e-3)  # it learned: the same tasks cost less


def test_dev_selection_through_the_kept_layers_is_evaluations(tiny_model, sample):
    tokenizer, model, examples, prompts, ids = _setup(tiny_model, sample)
    model.eval()
    frozen = FrozenLayers(model, model.config.num_hidden_layers - 1)
    selector = Selector(model, tokenizer, TAXONOMY, Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, DESIGN)
    batch = pad_batch(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        loss, scores = frozen.validate(batch, ids, [row[0] for row in selector.label_ids])
        whole = model(**batch).loss.item()
        expected = [list(s.scores.values()) for s in selector.select(prompts)]
        final = frozen.stack(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert loss.item() == pytest.approx(whole, rel=1e-5)
    assert loss.item() == pytest.approx(
        answer_loss(final, batch["labels"], frozen.causal.lm_head, 1.0).item(), rel=1e-6
    )
    assert scores.flatten().tolist() == pytest.approx([v for row in expected for v in row], abs=1e-4)
