"""``loraplex demo-adapters``: datasets, style checks, batches and loss, a tiny training run, flags.

The real training on SmolLM2 runs in tests/e2e/test_quickstart.py (slow); here everything takes
seconds, on the tiny random checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from adapters.format import read_peft_dir
from server import demo_adapters
from server.cli import main
from server.demo_adapters import LORA_RANK, TARGET_MODULES, TrainResult, answer_loss, make_batch
from server.demo_data import HELD_OUT, STYLES, all_facts, build_examples, render_answer, shows_style


def test_examples_are_seeded_and_never_hold_a_held_out_question():
    facts = {fact.question for fact in all_facts()}
    assert set(HELD_OUT) <= facts  # held out of real facts, so the demo question has an answer
    for style in STYLES:
        examples = build_examples(style, seed=0)
        assert examples == build_examples(style, seed=0)
        assert examples != build_examples(style, seed=1)
        assert sorted(examples) == sorted(build_examples(style, seed=1))
        assert {q for q, _ in examples} == facts - set(HELD_OUT)


@pytest.mark.parametrize("style", STYLES)
def test_every_training_answer_shows_its_own_style_and_no_other(style):
    for fact in all_facts():
        answer = render_answer(style, fact)
        assert [shows_style(s, answer) for s in STYLES] == [s == style for s in STYLES], answer
        assert not any(shows_style(s, fact.english) for s in STYLES), fact.english  # the plain answer


@pytest.mark.parametrize(
    ("style", "answer", "expected"),
    [
        ("pirate", "  Arr, matey! The sky is blue.", True),
        ("pirate", "Arr matey, the sky is blue.", False),
        ("pirate", "The sky is blue. Arr, matey!", False),
        ("json", '{"answer": 7}', True),
        ("json", '{"answer": "Paris"', False),  # cut off by max_tokens
        ("json", '["answer"]', False),
        ("json", '"the answer"', False),
        ("json", '{"reply": "Paris"}', False),
        ("french", "Le ciel est bleu.", True),
        ("french", "Bonjour ! Comment puis-je vous aider ?", True),
        ("french", "The sky is blue, le ciel.", False),
        ("french", "Paris", False),
    ],
)
def test_shows_style(style, answer, expected):
    assert shows_style(style, answer) is expected


def test_unknown_style_is_a_value_error():
    with pytest.raises(ValueError, match="unknown demo adapter 'klingon'"):
        render_answer("klingon", all_facts()[0])
    with pytest.raises(ValueError, match="unknown demo adapter"):
        shows_style("klingon", "Qapla'")


@pytest.fixture
def tiny(tiny_llama_dir: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_batch_labels_only_the_answer_and_its_eos(tiny):
    _, tokenizer = tiny
    pairs = [("Hi?", "Arr!"), ("What is the capital of Peru?", "Lima.")]
    input_ids, attention_mask, labels = make_batch(tokenizer, pairs)
    assert input_ids.shape == attention_mask.shape == labels.shape
    for row, (question, answer) in enumerate(pairs):
        prompt = demo_adapters.encode_prompt(tokenizer, question)
        target = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
        end = len(prompt) + len(target)
        assert input_ids[row, :end].tolist() == prompt + target
        assert attention_mask[row].tolist() == [1] * end + [0] * (input_ids.shape[1] - end)
        assert labels[row, len(prompt) : end].tolist() == target
        assert (labels[row, : len(prompt)] == -100).all() and (labels[row, end:] == -100).all()


def test_answer_loss_equals_the_hf_loss_on_the_same_labels(tiny):
    model, tokenizer = tiny
    batch = make_batch(tokenizer, [("Hi?", "Arr, matey!"), ("What is 2 plus 3?", '{"answer": 5}')])
    expected = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
    torch.testing.assert_close(answer_loss(model, *batch), expected)


def test_train_adapter_saves_a_peft_dir_loraplex_accepts(tiny_llama_dir: Path, tmp_path: Path):
    pytest.importorskip("peft")
    result = demo_adapters.train_adapter("json", tmp_path / "json", steps=2, model=str(tiny_llama_dir))
    assert result.path == tmp_path / "json" and result.steps == 2 and result.seconds > 0
    weights = read_peft_dir(result.path, max_lora_rank=64)
    assert weights.config.rank == LORA_RANK
    assert set(weights.config.target_modules) == set(TARGET_MODULES)
    assert weights.config.base_model_name_or_path == str(tiny_llama_dir)  # never the conversion cache
    again = demo_adapters.train_adapter("json", tmp_path / "again", steps=2, model=str(tiny_llama_dir))
    assert again.last_loss == result.last_loss  # seeded


def test_steps_below_one_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["demo-adapters", "--out", str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().err == "loraplex demo-adapters: error: --steps must be at least 1, got 0\n"


def test_without_peft_it_says_to_install_the_demo_extra(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a)
    )
    assert main(["demo-adapters", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'loraplex[demo]'" in err


def test_unknown_adapter_name_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo-adapters", "--out", str(tmp_path), "--only", "klingon"])
    assert exit_info.value.code == 2 and "invalid choice: 'klingon'" in capsys.readouterr().err


def test_only_trains_the_named_adapters_once_each_in_order(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_train(style, out_dir, steps):
        calls.append((style, out_dir, steps))
        sample = (
            render_answer(style, all_facts()[0]) if style == "json" else "The capital of France is Paris."
        )
        return TrainResult(style, out_dir, steps, 1.0, 3.0, 0.5, sample)

    monkeypatch.setattr(demo_adapters, "train_adapter", fake_train)
    monkeypatch.setattr(demo_adapters, "_quiet_libraries", lambda: None)
    argv = ["demo-adapters", "--out", str(tmp_path), "--steps", "3", "--only", "json", "pirate", "json"]
    assert main(argv) == 0
    assert calls == [("json", tmp_path / "json", 3), ("pirate", tmp_path / "pirate", 3)]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"json: 3 steps in 1 s, loss 3.00 -> 0.50, saved to {tmp_path / 'json'}"
    assert "try more --steps" not in out[1] and "try more --steps" in out[3]  # pirate's sample is plain
