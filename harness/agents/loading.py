"""Loading any Hugging Face causal LM and its tokenizer: the same call for the tiny model and a 7B."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# auto: bf16 on GPU, fp32 on CPU. bfloat16_if_native: bf16 on GPU and on CPUs with bf16 instructions (AMX or
# AVX512-BF16), fp32 elsewhere: without them bf16 is emulated, and a SmolLM2 forward took 4.4x fp32's time (AVX2).
DTYPES = ("auto", "bfloat16_if_native", "bfloat16", "float16", "float32")


def native_bfloat16(use_gpu: bool) -> bool:
    """Whether bf16 runs at least as fast as fp32 here: on a GPU, or on a CPU with AMX or AVX512-BF16."""
    import torch

    return use_gpu or torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def torch_dtype(name: str, use_gpu: bool) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    if name == "bfloat16_if_native":
        return torch.bfloat16 if native_bfloat16(use_gpu) else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str, dtype: str = "auto", trust_remote_code: bool = False, use_gpu: bool = False
) -> PreTrainedModel:
    """Any causal LM by hub id or local directory (the same call for the tiny model and a 7B)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=torch_dtype(dtype, use_gpu), trust_remote_code=trust_remote_code
    )
