"""MultiLoRALinear keeps one LoRA buffer layout and every kernel reads it as stored.

The slot buffers have the shapes ``lora_torch.slot_buffer_shapes`` defines, and a forward never
copies, permutes into a new tensor, gathers or casts the adapter weights: every aten op that reads
the buffers' storage during a forward is a view or a matrix product (seen with a dispatch mode, so
the check holds whatever kernel the op ends up in).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.model.lora_linear import MultiLoRALinear
from server.ops import lora_native, lora_torch
from server.ops.lora_torch import LoRASegments

COPYING_OPS = {"clone", "_to_copy", "copy_", "contiguous", "index_select", "index", "cat", "stack",
               "gather", "repeat", "_unsafe_index"}  # fmt: skip
PRODUCTS = {"mm", "bmm", "addmm", "baddbmm", "matmul"}
SLICES, SIZES, IN, RANK = ("q_proj", "k_proj", "v_proj"), (32, 8, 8), 24, 16


class StorageReads(TorchDispatchMode):
    """Names of the aten ops whose inputs share storage with any of ``watched``."""

    def __init__(self, watched: list[torch.Tensor]) -> None:
        super().__init__()
        self.pointers = {t.untyped_storage().data_ptr() for t in watched}
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = [*args, *(kwargs or {}).values()]
        flat += [t for a in args if isinstance(a, list | tuple) for t in a]
        if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.pointers for t in flat):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _layer(lora_op=None) -> MultiLoRALinear:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(sum(SIZES), IN, generator=gen)
    layer = MultiLoRALinear(weight, None, SLICES, SIZES, 4, RANK, SLICES, lora_op=lora_op)
    for slot, rank in enumerate((16, 4, 8)):
        pairs = {n: (torch.randn(rank, IN, generator=gen), torch.randn(s, rank, generator=gen))
                 for n, s in zip(SLICES, SIZES, strict=True)}  # fmt: skip
        layer.set_slot(slot, pairs, scale=0.5)
    return layer


def test_slot_buffers_have_the_one_layout():
    layer = _layer()
    shape_a, shape_b = lora_torch.slot_buffer_shapes(4, RANK, len(SLICES), IN, sum(SIZES))
    assert (tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)) == (shape_a, shape_b) == (
        (4, RANK, 3, IN), (4, RANK, 48),
    )  # fmt: skip
    assert layer.lora_a.is_contiguous() and layer.lora_b.is_contiguous()


OPS = [pytest.param(lora_torch.add_lora, id="torch")]
native = lora_native.load()
if native is not None:
    OPS.append(pytest.param(native.add_lora, id="native"))


@pytest.mark.parametrize("lora_op", OPS)
@pytest.mark.parametrize(
    "token_slots", [[0, 2, -1, 1], [0] * 9 + [1] * 7 + [-1] * 3], ids=["decode", "prefill"]
)
def test_a_forward_reads_the_adapter_buffers_in_place(lora_op, token_slots):
    layer = _layer(lora_op)
    segments = LoRASegments.build(token_slots, torch.device("cpu"), [16, 4, 8, 0])
    x = torch.randn(len(token_slots), IN)
    expected = x @ layer.weight.T
    lora_torch.add_lora_reference(expected, x, layer.lora_a, layer.lora_b, segments, layer.output_slices)
    with StorageReads([layer.lora_a, layer.lora_b]) as reads:
        y = layer(x, segments)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert not COPYING_OPS & set(reads.ops), reads.ops
    if lora_op is lora_torch.add_lora:  # the torch path reads them through products (the check sees it)
        assert PRODUCTS & set(reads.ops), reads.ops
