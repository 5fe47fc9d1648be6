"""QLoRA: an adapter trained with peft on a bitsandbytes 4-bit (NF4) base is served with
``--quantization nf4`` and gives peft's own outputs on that same quantized base.

The base is a tiny random Llama loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")`` on CPU; the adapter gets a few real training steps on it (QLoRA),
is saved with ``save_pretrained`` and uploaded to loraplex like any other.
"""

from __future__ import annotations

import pytest
import torch

from server.config import EngineConfig, ModelConfig
from server.engine.core import EngineCore
from server.model.factory import load_model
from tests.engine.test_engine_parity import our_last_logits

bnb = pytest.importorskip("bitsandbytes")
PROMPT = [256, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


def _four_bit_base(base_dir):
    """The checkpoint as transformers loads it in 4-bit NF4 on CPU (fp32 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    four_bit = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=four_bit, device_map="cpu",
                                                dtype=torch.float32)  # fmt: skip


def _train_qlora(base_dir, out_dir):
    """A peft LoRA trained for a few steps on the NF4 base, saved with save_pretrained: its dir."""
    from peft import LoraConfig, get_peft_model

    base = _four_bit_base(base_dir)
    torch.manual_seed(0)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir)
    return out_dir


def _last_logits(model, bf16_cpu_kernel: bool) -> torch.Tensor:
    """The model's last-token logits of PROMPT. On CPUs with AVX512-BF16 bitsandbytes' Linear4bit
    repacks its weight for a bf16 kernel at inference; without it, it computes in fp32."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not bf16_cpu_kernel:
            module.support_avx512bf16_for_cpu = False
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits[0, -1]


def test_a_qlora_adapter_is_served_as_peft_serves_it(tiny_llama_dir, tmp_path):
    """Equal to peft's fp32 math on the same NF4 codes to float rounding; to bitsandbytes' bf16 CPU
    kernel (what peft runs by default on an AVX512-BF16 CPU) to bf16 rounding."""
    from peft import PeftModel

    adapter_dir = _train_qlora(tiny_llama_dir, tmp_path / "qlora")
    expected_base = _last_logits(_four_bit_base(tiny_llama_dir), bf16_cpu_kernel=False)
    served = PeftModel.from_pretrained(
        _four_bit_base(tiny_llama_dir), adapter_dir
    ).eval()  # as peft serves it
    expected = _last_logits(served, bf16_cpu_kernel=False)
    config = EngineConfig(max_loras=2, max_lora_rank=8, max_num_seqs=2, max_num_batched_tokens=64)
    model_config = ModelConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu", quantization="nf4")
    core = EngineCore(load_model(model_config, config), config)
    core.add_adapter("qlora", adapter_dir)
    torch.testing.assert_close(our_last_logits(core, PROMPT, None), expected_base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(our_last_logits(core, PROMPT, "qlora"), expected, rtol=1e-4, atol=1e-4)
    assert (expected - expected_base).abs().max() > 1e-2  # the trained adapter changes the output
    peft_default = _last_logits(PeftModel.from_pretrained(_four_bit_base(tiny_llama_dir), adapter_dir).eval(),
                                bf16_cpu_kernel=True)  # fmt: skip
    torch.testing.assert_close(our_last_logits(core, PROMPT, "qlora"), peft_default, rtol=2e-2, atol=2e-2)
    modules = [m for _, m in core.loaded.model.lora_layers()]
    assert all(m.quantized is not None and m.quantized.scheme == "nf4" for m in modules)
