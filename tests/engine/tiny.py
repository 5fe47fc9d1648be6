"""Tiny random Llama checkpoints (real safetensors + a real byte-level tokenizer) and engine helpers."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.model.factory import load_model

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (ids 0-255) plus <s>=256 (bos) and </s>=257 (eos)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab.update({"<s>": 256, "</s>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_tiny_llama(path: Path, seed: int = 0, family: str = "llama", **overrides) -> Path:
    """A random 2-layer Llama-family model (GQA, vocab 260) saved as an HF checkpoint with tokenizer.

    ``family`` picks the architecture: llama, mistral or qwen2 (q/k/v biases).
    """
    return save_checkpoint(random_llama(seed, family, **overrides), path)


def random_llama(
    seed: int = 0,
    family: str = "llama",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **overrides,
) -> PreTrainedModel:
    """A random Llama-family HF model (``write_tiny_llama``'s shapes unless overridden), built in
    ``dtype`` straight on ``device``: an 8B-shaped one is made on a GPU in seconds, never in fp32."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=256, eos_token_id=257, tie_word_embeddings=False,
    )  # fmt: skip
    fields.update(overrides)
    config_cls, model_cls = FAMILIES[family]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # HF initialises the parameters in the default dtype
    try:
        with torch.device(device):
            model = model_cls(config_cls(**fields)).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # HF initialises biases to zero; random ones make the bias path count
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    return model


def save_checkpoint(model: PreTrainedModel, path: Path) -> Path:
    """``model`` as an HF checkpoint dir (safetensors) with ``byte_level_tokenizer``'s files."""
    model.save_pretrained(path, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(path)
    return path


def make_core(model_dir: Path, **engine_overrides) -> EngineCore:
    """An EngineCore on a checkpoint dir, fp32 CPU, with small engine limits unless overridden."""
    settings = dict(
        max_loras=4, max_lora_rank=16, max_num_seqs=8, max_num_batched_tokens=256, merge_policy="off"
    )
    settings.update(engine_overrides)
    engine_config = EngineConfig(**settings)
    loaded = load_model(ModelConfig(model=str(model_dir), dtype="float32", device="cpu"), engine_config)
    return EngineCore(loaded, engine_config)


def run_to_completion(core: EngineCore, max_steps: int = 10_000, timeout_s: float = 60) -> dict[str, list]:
    """Step until idle; request id → list of deltas. Idle steps (adapters loading) wait a little."""
    deltas: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    for _ in range(max_steps):
        if not core.has_work:
            return deltas
        for delta in core.step():
            deltas.setdefault(delta.request_id, []).append(delta)
        if core.last_step_was_idle:
            if time.monotonic() > deadline:
                break
            time.sleep(0.002)
    raise AssertionError("engine did not finish")
