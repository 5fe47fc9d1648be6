"""Engine fixtures."""

from pathlib import Path

import pytest

from tests.engine.tiny import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A random 2-layer Llama checkpoint directory shared by the engine tests."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
