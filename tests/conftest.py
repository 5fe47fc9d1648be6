"""Session-wide test settings.

Without a GPU, Triton kernels run in its interpreter. The flag must be set before anything imports
triton (transformers and peft may), so it is set here, before any test module is collected.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
