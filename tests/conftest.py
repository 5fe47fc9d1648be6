"""Session-wide test settings.

Without a GPU, Triton kernels run in its interpreter. The flag must be set before anything imports
triton (transformers and peft may), so it is set here, before any test module is collected.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llama_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(seed=0, family="llama", **config_overrides) -> Path``: a tiny random checkpoint.

    Writes with ``tests.engine.tiny.write_tiny_llama`` (2 layers, hidden 64, GQA, vocab 260,
    byte-level tokenizer with bos ``<s>``=256, eos ``</s>``=257 and a chat template; ``family``
    is llama, mistral or qwen2). Each distinct argument set is built once per session; treat the
    directory as read-only, it is shared.
    """
    from tests.engine.tiny import write_tiny_llama  # after the env settings above

    built: dict[tuple, Path] = {}

    def factory(seed: int = 0, family: str = "llama", **config_overrides) -> Path:
        key = (seed, family, tuple(sorted(config_overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = write_tiny_llama(path, seed=seed, family=family, **config_overrides)
        return built[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama_factory: Callable[..., Path]) -> Path:
    """A tiny random Llama checkpoint (seed 0, untied embeddings) + tokenizer; read-only."""
    return tiny_llama_factory(seed=0)
