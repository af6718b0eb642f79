import pytest

from harness.agents.encoding import encode_example
from harness.agents.loading import load_tokenizer
from harness.agents.prompts import INSTRUCTIONS, choice_question, conversation, target, target_text
from harness.agents.selection import Mode, Strategy, agent_prompt
from harness.agents.tokens import TokenDesign
from harness.data.taxonomy import load_taxonomy
from harness.train.data import pad_batch

MESSAGES = [
    {"role": "system", "content": "You are a clinical assistant."},
    {"role": "user", "content": "Dr. Reyes (attending): 70-year-old woman with cough."},
    {"role": "user", "content": "Dr. Reyes: Please draft the order for amoxicillin 1000 mg three times daily."},
]


def test_consecutive_turns_merge_and_system_extras_append():
    merged = conversation(MESSAGES, extra_system="Extra.")
    assert [m["role"] for m in merged] == ["system", "user"]
    assert merged[0]["content"].endswith("\nExtra.")
    assert "70-year-old" in merged[1]["content"] and "amoxicillin" in merged[1]["content"]


def test_prompt_masking_and_targets(tiny_model):
    taxonomy = load_taxonomy()
    tokenizer = load_tokenizer(str(tiny_model))
    design = TokenDesign()
    design.add_to_tokenizer(tokenizer, taxonomy)
    row = {"category": "risk_identification", "gold_behavior": "proactive", "reference": "Caution: allergy."}
    assert target_text(row, design, taxonomy) == "<behavior:proactive> Caution: allergy."
    assert target_text(row, None, taxonomy) == "Caution: allergy."
    answer = target(tokenizer, row, design, taxonomy)
    prompt = agent_prompt(tokenizer, MESSAGES, Mode.BEHAVIORSFT, Strategy.BEHAVIOR_TOKEN, design, taxonomy)
    assert prompt.text.endswith("<|im_start|>assistant\n")
    example = encode_example(tokenizer, prompt, answer, max_length=512)
    prompt_len = len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    learned = example["labels"][prompt_len:]
    assert learned == example["input_ids"][prompt_len:]
    assert learned[0] == tokenizer.convert_tokens_to_ids("<behavior:proactive>")
    assert learned[-1] == tokenizer.eos_token_id
    short = encode_example(tokenizer, prompt, answer, max_length=40)
    assert len(short["input_ids"]) == 40 and short["labels"][-len(learned) :] == learned
    instructed = agent_prompt(tokenizer, MESSAGES, Mode.INSTRUCTED, Strategy.GENERATE, None, taxonomy)
    assert INSTRUCTIONS in instructed.text and "Reply with the letter" not in instructed.text


def test_choice_prompt_asks_last_with_one_lettered_option_per_behavior(tiny_model):
    taxonomy = load_taxonomy()
    tokenizer = load_tokenizer(str(tiny_model))
    question, letters = choice_question(taxonomy)
    assert letters == {"reactive": "A", "proactive": "B"}
    assert "(A) Answer what was asked" in question and "(B) Intervene unprompted" in question
    prompt = agent_prompt(tokenizer, MESSAGES, Mode.ZERO_SHOT, Strategy.CHOICE, None, taxonomy)
    assert prompt.text.endswith(question + "<|im_end|>\n<|im_start|>assistant\n")
    assert "amoxicillin" in prompt.text and INSTRUCTIONS not in prompt.text
    instructed = agent_prompt(tokenizer, MESSAGES, Mode.INSTRUCTED, Strategy.CHOICE, None, taxonomy).text
    assert INSTRUCTIONS in instructed and instructed.endswith(question + "<|im_end|>\n<|im_start|>assistant\n")


def test_pad_batch_pads_right_and_masks_padding_out_of_the_loss():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_weighted_loss_is_the_models_loss_at_weight_one_and_weighs_the_first_answer_token(tiny_model):
    import torch

    from harness.agents.loading import load_model
    from harness.train.recipe import weighted_loss

    model = load_model(str(tiny_model)).eval()
    batch = pad_batch(
        [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}, {"input_ids": [4, 3], "labels": [-100, 3]}],
        pad_id=0,
    )
    with torch.no_grad():
        out = model(**batch)
        assert weighted_loss(out.logits, batch["labels"], 1.0).item() == pytest.approx(out.loss.item(), rel=1e-5)
        per_token = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), reduction="none"
        ).view(2, -1)
        # answer tokens: row 0 positions 1 (first, the behavior token), 2, 3; row 1 position 0 (first)
        expected = (3 * per_token[0, 1] + per_token[0, 2] + per_token[0, 3] + 3 * per_token[1, 0]) / 8
        assert weighted_loss(out.logits, batch["labels"], 3.0).item() == pytest.approx(expected.item(), rel=1e-5)
