"""Models: the tiny embedded Qwen2, loading any Hugging Face causal LM, and LoRA through peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness.bench.io import load_tasks
from harness.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from harness.bench.taxonomy import Taxonomy
    from harness.tokens import TokenDesign

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass
class ModelSettings:
    """Which model to load and how."""

    name_or_path: str = "artifacts/tiny-qwen2"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def local_or_hub(name_or_path: str) -> str:
    """An existing local directory made absolute; otherwise a hub id (`org/name`), checked for shape."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path.resolve())
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ConfigError(
            f"model.name_or_path: {name_or_path} is neither an existing directory nor a hub id like org/name "
            "(run `harness model make-tiny` for the embedded default)"
        )
    return name_or_path


DTYPES = ("auto", "bfloat16", "float16", "float32")


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(settings: ModelSettings, use_gpu: bool = False) -> PreTrainedModel:
    """Any causal LM by hub id or local directory (the same call for the tiny model and a 7B)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        settings.name_or_path,
        dtype=torch_dtype(settings.dtype, use_gpu),
        trust_remote_code=settings.trust_remote_code,
    )


def wrap_lora(model: PreTrainedModel, lora: LoraSettings, new_token_ids: list[int]) -> PreTrainedModel:
    """LoRA adapters on attention, plus the new behavior-token rows as trainable tokens."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        trainable_token_indices={"embed_tokens": list(new_token_ids)} if new_token_ids else None,
    )
    return get_peft_model(model, config)


def add_behavior_tokens(base: str | Path, out: str | Path, design: TokenDesign, taxonomy: Taxonomy) -> Path:
    """Save `base` with `design`'s behavior tokens added and initialised, untrained: a model that a
    behaviorsft agent can load before any fine-tuning (a baseline, and a fixed model to benchmark)."""
    tokenizer, model = load_tokenizer(str(base)), load_model(ModelSettings(str(base)))
    design.apply(tokenizer, model, taxonomy)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    design.save(out)
    return Path(out)


def make_tiny(data: str | Path, out: str | Path, vocab_size: int = 2048, seed: int = 0) -> Path:
    """Train a BPE tokenizer on BehaviorBench-mini and save a randomly initialised tiny Qwen2 with it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    frame = load_tasks(data)
    texts = [m["content"] for messages in frame["messages"] for m in messages] + list(frame["reference"])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out
