"""Maps peft adapter tensors onto our fused MultiLoRALinear modules and writes them into slots.

Implements the ``SlotWriter`` protocol of ``adapters.cache``: the cache decides *which* slot,
this module knows *where* each (layer, projection) tensor goes.
"""

from __future__ import annotations

import torch

from adapters.errors import AdapterFormatError
from adapters.format import LoRAWeights
from adapters.merge import merged_weight
from server.model.llama import LlamaForServing
from server.model.lora_linear import MultiLoRALinear

_Pair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out_n, r]) of one projection


class LoRASlotWriter:
    def __init__(self, model: LlamaForServing, max_lora_rank: int) -> None:
        self.max_lora_rank = max_lora_rank
        self.modules: dict[tuple[int, str], MultiLoRALinear] = {}
        for layer, module in model.lora_layers():
            for name in module.lora_names:
                self.modules[(layer, name)] = module
        self.num_layers = len(model.layers)
        num_slots = max((m.lora_a.shape[0] for m in self.modules.values()), default=0)
        # Rank of the adapter in each slot (0: empty): the runner slices the buffers to the largest
        # rank of a step, so an adapter costs its own rank.
        self.slot_ranks: list[int] = [0] * num_slots

    @property
    def quantization(self) -> str | None:
        """The scheme of the quantized base weights (None: dense): merged copies need dense ones."""
        schemes = {m.quantized.scheme for m in self.modules.values() if m.quantized is not None}
        return ", ".join(sorted(schemes)) or None

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({name for _, name in self.modules}))

    def validate(self, weights: LoRAWeights) -> None:
        """Raise AdapterFormatError unless every tensor fits a LoRA slice of this model."""
        if weights.config.rank > self.max_lora_rank:
            raise AdapterFormatError(f"rank {weights.config.rank} exceeds max_lora_rank={self.max_lora_rank}")
        for (layer, proj), (lora_a, lora_b) in weights.tensors.items():
            module = self.modules.get((layer, proj))
            if module is None:
                where = f"layer {layer}" if layer >= self.num_layers else f"{proj}"
                raise AdapterFormatError(
                    f"adapter targets {proj} in layer {layer}, which this server does not serve ({where}: "
                    f"the model has {self.num_layers} layers, LoRA targets {', '.join(self.target_modules)})"
                )
            expected_a = (weights.config.rank, module.in_features)
            expected_b = (module.slice_out_features(proj), weights.config.rank)
            if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
                raise AdapterFormatError(
                    f"layer {layer} {proj}: lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} "
                    "do not "
                    f"match the base model, expected {expected_a} / {expected_b}"
                )

    def write(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into ``slot`` of every LoRA module (untargeted ones are zeroed)."""
        per_module: dict[int, dict[str, _Pair]] = {id(m): {} for m in self.modules.values()}
        for (layer, proj), pair in weights.tensors.items():
            per_module[id(self.modules[(layer, proj)])][proj] = pair
        self.slot_ranks[slot] = self.max_lora_rank  # while half-written, read it all
        for module in {id(m): m for m in self.modules.values()}.values():
            module.set_slot(slot, per_module[id(module)], weights.config.scale)
        self.slot_ranks[slot] = weights.config.rank

    def merged_weights(self, weights: LoRAWeights) -> dict[MultiLoRALinear, torch.Tensor]:
        """A merged copy W + s·B·A of every module the adapter touches (others keep the base weight).

        A fused module (q|k|v, gate|up) is copied whole even when the adapter targets one slice.
        """
        per_module: dict[MultiLoRALinear, list[tuple[tuple[int, int], torch.Tensor, torch.Tensor]]] = {}
        for (layer, proj), (lora_a, lora_b) in weights.tensors.items():
            module = self.modules[(layer, proj)]
            bounds = module.output_slices[module.slice_names.index(proj)]
            per_module.setdefault(module, []).append((bounds, lora_a, lora_b))
        with torch.inference_mode():
            return {
                m: m.prepare(merged_weight(m.weight, d, weights.config.scale)) for m, d in per_module.items()
            }

    def merged_bytes(self, weights: LoRAWeights) -> int:
        """Bytes ``merged_weights(weights)`` will hold: every touched module's whole weight."""
        touched = {id(self.modules[key]): self.modules[key] for key in weights.tensors}
        return sum(m.weight.numel() * m.weight.element_size() for m in touched.values())

    def clear(self, slot: int) -> None:
        for module in {id(m): m for m in self.modules.values()}.values():
            module.clear_slot(slot)
        self.slot_ranks[slot] = 0
