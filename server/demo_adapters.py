"""``loraplex demo-adapters``: train small LoRA adapters on the embedded SmolLM2, on CPU, in minutes.

One adapter per style of :mod:`server.demo_data` (``pirate``, ``json``, ``french``), each learnt from
that module's synthetic, seeded dataset: chat-template prompts, loss on the answer tokens only, LoRA
on ``q_proj``/``v_proj``. Each is saved with peft's ``save_pretrained`` (``adapter_config.json`` +
``adapter_model.safetensors``) under ``OUT/NAME``, ready for ``POST /v1/adapters`` or ``loraplex
serve --adapter NAME=OUT/NAME``. Training needs ``peft`` (``pip install 'loraplex[demo]'``); torch,
transformers and peft are imported only when training starts, so the CLI stays light.

Measured on the 2-core CPU: about 2 s per step of 8 examples, so about 40 s per adapter at the
default 20 steps; by then each style shows on every held-out question.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from server.config import DEFAULT_MODEL
from server.demo_data import HELD_OUT, STYLES, build_examples, shows_style

USAGE_ERROR = 2  # the exit status server.cli uses for bad settings
DEFAULT_STEPS = 20
BATCH_SIZE = 8
LEARNING_RATE = 2e-3
LORA_RANK = 8
LORA_ALPHA = 16
TARGET_MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TrainResult:
    style: str
    path: Path  # the saved peft directory
    steps: int
    seconds: float  # training alone, without loading the model, saving or the sample
    first_loss: float
    last_loss: float
    sample: str  # the adapter's greedy answer to HELD_OUT[0]


def load_base(model: str = DEFAULT_MODEL):
    """(HF model in float32 on CPU, tokenizer) for ``model``, through the loader's conversion cache.

    The embedded default is converted from its GGUF once (``server.model.loader``) and reused.
    """
    import torch
    import transformers

    from server.config import ModelConfig
    from server.model.loader import resolve_checkpoint

    checkpoint = resolve_checkpoint(ModelConfig(model=model, dtype="float32", device="cpu"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32)
    return hf_model, checkpoint.tokenizer


def encode_prompt(tokenizer, question: str) -> list[int]:
    """The chat-template prompt for one user ``question``, as the server renders it."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_batch(tokenizer, pairs: list[tuple[str, str]]):
    """(input_ids [B, T], attention_mask [B, T], labels [B, T]) for (question, answer) pairs.

    Right-padded; labels are -100 except on the answer tokens and the closing eos, so the loss
    teaches only what the assistant says, and when it stops.
    """
    import torch

    eos = tokenizer.eos_token_id
    encoded = [
        (encode_prompt(tokenizer, q), [*tokenizer.encode(a, add_special_tokens=False), eos]) for q, a in pairs
    ]
    length = max(len(p) + len(a) for p, a in encoded)
    input_ids = torch.full((len(pairs), length), tokenizer.eos_token_id)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), -100)
    for row, (prompt, answer) in enumerate(encoded):
        end = len(prompt) + len(answer)
        input_ids[row, :end] = torch.tensor(prompt + answer)
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = torch.tensor(answer)
    return input_ids, attention_mask, labels


def answer_loss(hf_model, input_ids, attention_mask, labels):
    """Mean next-token cross-entropy over the labelled positions (as HF's ``labels=`` loss computes).

    Only those positions go through the vocabulary-sized head, not the prompt's.
    """
    import torch

    hidden = hf_model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]  # [B, T-1]: position t predicts token t+1
    selected = targets != -100
    logits = hf_model.lm_head(hidden[:, :-1][selected])  # [N, vocab]
    return torch.nn.functional.cross_entropy(logits, targets[selected])


def train_adapter(
    style: str, out_dir: Path, steps: int = DEFAULT_STEPS, seed: int = 0, model: str = DEFAULT_MODEL
) -> TrainResult:
    """Train the ``style`` adapter on ``model`` for ``steps`` AdamW steps; save it to ``out_dir``.

    Batches of :data:`BATCH_SIZE` walk the shuffled examples in order (wrapping around); the learning
    rate decays linearly to zero. Same arguments → the same adapter on the same machine. The saved
    ``base_model_name_or_path`` is ``model`` (the embedded name, not the conversion cache's path).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    hf_model, tokenizer = load_base(model)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(TARGET_MODULES))
    with warnings.catch_warnings():  # peft 0.21 calls a method transformers 5 deprecates
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(hf_model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    examples, losses = build_examples(style, seed), []
    start = time.perf_counter()
    for step in (bar := tqdm(range(steps), desc=f"{style:>6}", unit="step", file=sys.stderr)):
        pairs = [examples[(step * BATCH_SIZE + i) % len(examples)] for i in range(BATCH_SIZE)]
        loss = answer_loss(hf_model, *make_batch(tokenizer, pairs))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start
    peft_model.peft_config["default"].base_model_name_or_path = model
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)  # no vocab check against the hub
    sample = generate_answer(peft_model, tokenizer, HELD_OUT[0])
    return TrainResult(style, out_dir, steps, seconds, losses[0], losses[-1], sample)


def generate_answer(hf_model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """The greedy chat answer of ``hf_model`` (base or peft-wrapped) to one user ``question``."""
    import torch

    prompt = torch.tensor([encode_prompt(tokenizer, question)])
    with torch.inference_mode():
        output = hf_model.eval().generate(prompt, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt.shape[1] :], skip_special_tokens=True).strip()


def add_demo_adapters_parser(commands: argparse._SubParsersAction) -> None:
    """Register ``demo-adapters`` on the ``loraplex`` subcommand parser."""
    parser = commands.add_parser(
        "demo-adapters", help=f"train small demo LoRA adapters ({', '.join(STYLES)}) on the embedded model"
    )
    parser.add_argument("--out", required=True, type=Path, help="each adapter is saved to OUT/NAME")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"per adapter (default {DEFAULT_STEPS})"
    )
    parser.add_argument(
        "--only", nargs="+", choices=STYLES, metavar="NAME", help=f"train only these of {', '.join(STYLES)}"
    )
    parser.set_defaults(func=demo_adapters_command)


def demo_adapters_command(args: argparse.Namespace) -> int:
    """Train and save each chosen adapter, printing its timing and a held-out answer; 2 for bad usage."""
    import importlib.util

    if args.steps < 1:
        print(f"loraplex demo-adapters: error: --steps must be at least 1, got {args.steps}", file=sys.stderr)
        return USAGE_ERROR
    if importlib.util.find_spec("peft") is None:
        print("loraplex demo-adapters: error: needs peft: pip install 'loraplex[demo]'", file=sys.stderr)
        return USAGE_ERROR
    _quiet_libraries()
    for style in dict.fromkeys(args.only or STYLES):
        result = train_adapter(style, args.out / style, args.steps)
        print(
            f"{style}: {result.steps} steps in {result.seconds:.0f} s, loss {result.first_loss:.2f} -> "
            f"{result.last_loss:.2f}, saved to {result.path}"
        )
        hint = "" if shows_style(style, result.sample) else "  (no sign of the style yet: try more --steps)"
        print(f"  {HELD_OUT[0]} -> {result.sample}{hint}", flush=True)
    return 0


def _quiet_libraries() -> None:
    """No transformers weight-loading bars between our own progress lines (a process-wide switch)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
