"""lm-evaluation-harness as a real client: its ``local-completions`` model scores two small local
tasks (tests/e2e/lm_eval_task: multiple choice and a rolling perplexity) through a real server,
and, for the base, a third one the test writes (continuations the model picks greedily, or not).

Two ``lm_eval`` processes run at the same time against one ``loraplex serve`` of a tiny random
Llama (with a keys file), so the server batches their requests together: docs/api.md's command as
written (token-id prompts, batches of 4, 2 concurrent requests) against a peft adapter, and a run
of the base model with text prompts (``tokenized_requests=False``, one prompt a request, 4
concurrent) and ``max_length=64``, so that the longer rolling texts are scored in two windows.
Every sample's loglikelihood and is_greedy in lm-eval's ``--log_samples`` output is checked
against HF transformers (the base) or peft (the adapter) on the same context and continuation
tokens, and each task's metrics against those computed from the HF values. The other model's
scores of the same requests are far off next to the tolerance, so a wrong logprob shows.
Everything is offline: the data are local JSON lines files and the hub is never asked.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.tenants import add_key
from tests.api.server_process import REPO_ROOT, running_server
from tests.api.test_logprobs_api import greedy_ids, hf_logprobs
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

pytestmark = pytest.mark.slow
lm_eval_utils = pytest.importorskip(
    "lm_eval.utils", reason="needs lm-evaluation-harness: pip install -e '.[eval]'"
)

API_DOC = REPO_ROOT / "docs" / "api.md"
SECTION = "#### Evaluating an adapter with lm-evaluation-harness"
TASK_DIR = REPO_ROOT / "tests" / "e2e" / "lm_eval_task"
MC_TASK, ROLLING_TASK = "loraplex_tiny_mc", "loraplex_tiny_rolling"
GREEDY_TASK = "loraplex_tiny_greedy"  # written by the test: what the base model picks, and not
GREEDY_CONTEXTS = 3
GREEDY_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: context
doc_to_target: continuation
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
BASE = "tiny"  # --served-model-name
ADAPTER = "support-bot"  # the adapter docs/api.md's command evaluates
DOC_OUTPUT = "lm-eval-results"  # the doc command's --output_path, pointed at a temp dir here
LM_EVAL_TIMEOUT_S = 240
TOLERANCE = 2e-4  # on a sum of up to 75 fp32 token logprobs (seen: under 5e-6)
APART = 5 * TOLERANCE  # the least the base and the adapter differ by on any request (seen: 0.006)
# lm-eval's max_length by run: the doc's command sets none (lm-eval's 2048: one rolling window a doc);
# the base run's 64 cuts the longer rolling docs into two windows, the second without the bos token
MAX_LENGTH = {ADAPTER: 2048, BASE: 64}
BASE_MODEL_ARGS = (
    f"tokenizer_backend=huggingface,tokenized_requests=False,num_concurrent=4,max_retries=1,"
    f"max_length={MAX_LENGTH[BASE]}"
)


@dataclass(frozen=True)
class Run:
    """One lm_eval process's output: the results file and each task's logged samples by doc_id."""

    results: dict
    samples: dict[str, list[dict]]  # task -> samples, in doc_id order


def documented_command() -> str:
    """The shell command of docs/api.md's lm-evaluation-harness section (continuation lines joined)."""
    text = API_DOC.read_text()
    start = text.index(SECTION)
    section = text[start : text.index("\n#", start + len(SECTION))]
    [block] = re.findall(r"^```shell\n(.*?)^```$", section, flags=re.M | re.S)
    return block.replace("\\\n", " ").strip()


def lm_eval_env(root: Path, url: str, key: str, model_dir: Path) -> dict[str, str]:
    """The doc's variables, the venv's ``lm_eval`` first on PATH, the hub and datasets offline, and
    every HF cache in ``root`` (datasets' Arrow cache of the task data included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    env.update(URL=url, KEY=key, MODEL_DIR=str(model_dir), HF_HOME=str(root / "hf"))
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_lm_eval(command: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``command`` in bash from the repository root (the tasks' data paths are relative to it)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", command], cwd=REPO_ROOT, env=env, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def finish(process: subprocess.Popen, log: Path, output: Path, tasks: Sequence[str]) -> Run:
    """Wait for an lm_eval process; its Run, read from the one model folder under ``output``."""
    try:
        process.wait(timeout=LM_EVAL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if process.returncode != 0:
        pytest.fail(f"lm_eval exited {process.returncode}:\n{log.read_text(errors='replace')[-6000:]}")
    [model_dir] = [d for d in output.iterdir() if d.is_dir()]
    [results] = model_dir.glob("results_*.json")
    samples = {}
    for task in tasks:
        [path] = model_dir.glob(f"samples_{task}_*.jsonl")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(lines, key=lambda s: s["doc_id"])
    return Run(json.loads(results.read_text()), samples)


@dataclass(frozen=True)
class Checkpoints:
    root: Path
    model_dir: Path
    adapter_dir: Path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    root = tmp_path_factory.mktemp("lm-eval")
    model_dir = write_tiny_llama(root / "model")
    adapter_dir = save_peft_adapter(model_dir, root / ADAPTER, seed=31, r=8, lora_alpha=16,
                                    target_modules=["q_proj", "v_proj", "up_proj"])  # fmt: skip
    return Checkpoints(root, model_dir, adapter_dir)


@pytest.fixture(scope="module")
def tokenizer(checkpoints: Checkpoints):
    return AutoTokenizer.from_pretrained(checkpoints.model_dir)


@pytest.fixture(scope="module")
def references(checkpoints: Checkpoints) -> dict[str, torch.nn.Module]:
    """HF's base model and peft's model of the adapter, by served name."""
    base = AutoModelForCausalLM.from_pretrained(checkpoints.model_dir)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoints.model_dir),
                                        checkpoints.adapter_dir)  # fmt: skip
    return {BASE: base.eval(), ADAPTER: adapter.eval()}


@pytest.fixture(scope="module")
def greedy_docs(checkpoints: Checkpoints, tokenizer, references) -> list[dict]:
    """The base run's third task, written to ``<root>/tasks`` with copies of the two others."""
    tasks = checkpoints.root / "tasks"
    tasks.mkdir()
    for task in (MC_TASK, ROLLING_TASK):
        shutil.copy(TASK_DIR / f"{task}.yaml", tasks)
    docs = greedy_task_docs(references[BASE], tokenizer)
    (tasks / f"{GREEDY_TASK}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / f"{GREEDY_TASK}.yaml").write_text(
        GREEDY_YAML.format(task=GREEDY_TASK, data=tasks / f"{GREEDY_TASK}.jsonl")
    )
    return docs


@pytest.fixture(scope="module")
def runs(checkpoints: Checkpoints, greedy_docs) -> Iterator[dict[str, Run]]:
    """Both lm_eval runs, finished, by served model name."""
    root = checkpoints.root
    keys_file = root / "keys.json"
    key = add_key(keys_file, "default")  # a user of the tenant the --adapter flags serve in
    args = [
        "--model", str(checkpoints.model_dir), "--served-model-name", BASE,
        "--adapter", f"{ADAPTER}={checkpoints.adapter_dir}", "--keys-file", str(keys_file),
        "--data-dir", str(root / "data"), "--max-lora-rank", "16", "--max-num-seqs", "4",
        "--max-num-batched-tokens", "32", "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    doc_command = documented_command()
    assert f"--output_path {DOC_OUTPUT}" in doc_command, doc_command
    outputs = {ADAPTER: root / "out-adapter", BASE: root / "out-base"}
    tasks = {ADAPTER: (MC_TASK, ROLLING_TASK), BASE: (MC_TASK, ROLLING_TASK, GREEDY_TASK)}
    commands = {
        ADAPTER: doc_command.replace(f"--output_path {DOC_OUTPUT}", f"--output_path {outputs[ADAPTER]}"),
        BASE: (
            f"OPENAI_API_KEY=$KEY lm_eval run --model local-completions --model_args "
            f"base_url=$URL/v1/completions,model={BASE},tokenizer=$MODEL_DIR,{BASE_MODEL_ARGS} "
            f"--include_path {root / 'tasks'} --tasks {','.join(tasks[BASE])} --log_samples "
            f"--output_path {outputs[BASE]}"
        ),
    }
    with running_server(args, root / "server.log") as server:
        env = lm_eval_env(root, server.url, key, checkpoints.model_dir)
        logs = {model: root / f"lm-eval-{model}.log" for model in commands}
        processes = {model: start_lm_eval(c, env, logs[model]) for model, c in commands.items()}
        try:
            yield {m: finish(p, logs[m], outputs[m], tasks[m]) for m, p in processes.items()}
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.kill()
                    process.wait()


def greedy_task_docs(model, tokenizer) -> list[dict]:
    """Contexts (prefixes of the rolling task's texts), each twice: followed by the two tokens
    ``model`` picks greedily after it, then by the first of them and a letter it does not pick.
    Only contexts whose greedy tokens are the encoding of their text are taken (not a special
    token, not a byte of a multi-byte character)."""
    docs = []
    letters = [token_ids(tokenizer, letter)[0] for letter in "etaoinshr"]
    for text in (d["text"] for d in task_docs(ROLLING_TASK)):
        for end in range(8, len(text), 5):
            context = text[:end].rstrip()
            picked = greedy_ids(model, token_ids(tokenizer, context), 2)
            if token_ids(tokenizer, tokenizer.decode(picked)) == picked and len(docs) < 2 * GREEDY_CONTEXTS:
                other = next(t for t in letters if t != picked[1])
                for continuation in (picked, [picked[0], other]):
                    docs.append({"context": context, "continuation": tokenizer.decode(continuation)})
    assert len(docs) == 2 * GREEDY_CONTEXTS, docs
    return docs


def task_docs(task: str) -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / f"{task}.jsonl").read_text().splitlines()]


def token_ids(tokenizer, text: str) -> list[int]:
    """``text``'s tokens as lm-eval's huggingface tokenizer backend encodes them: no special tokens."""
    return tokenizer(text, add_special_tokens=False).input_ids


def score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of the continuation's logprobs after the context, whether each token is the argmax)."""
    rows = hf_logprobs(model, context + continuation)[len(context) - 1 :]  # [len(continuation), V]
    picked = rows[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float(picked.sum()), bool((rows.argmax(-1) == torch.tensor(continuation)).all())


def mc_reference(model, tokenizer, doc: dict) -> list[tuple[float, bool]]:
    """Each choice's (loglikelihood, is_greedy) as a continuation " choice" of the question."""
    context = token_ids(tokenizer, doc["question"])
    return [score(model, context, token_ids(tokenizer, " " + choice)) for choice in doc["choices"]]


def rolling_windows(tokenizer, text: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) windows lm-eval's API models score a text in: the first after the
    bos token, each later one after the tokens before it, at most ``max_length - 1`` tokens each
    (lm-eval's own window functions: what the client asks, not what the server answers)."""
    windows = lm_eval_utils.get_rolling_token_windows(
        token_list=token_ids(tokenizer, text), prefix_token=tokenizer.bos_token_id,
        max_seq_len=max_length - 2, context_len=1,
    )  # fmt: skip
    return [lm_eval_utils.make_disjoint_window(window) for window in windows]


def rolling_reference(model, tokenizer, text: str, max_length: int) -> float:
    """The text's loglikelihood: the sum over its windows."""
    return sum(score(model, *window)[0] for window in rolling_windows(tokenizer, text, max_length))


def logged(sample: dict) -> list[tuple[float, bool]]:
    """A loglikelihood or multiple-choice sample's filtered (loglikelihood, is_greedy) per request
    (per choice), from the strings lm-eval logs."""
    return [(float(ll), greedy == "True") for ll, greedy in sample["filtered_resps"]]


# ---- multiple choice ----
@pytest.mark.parametrize("model", [ADAPTER, BASE])
def test_multiple_choice_loglikelihoods_and_accuracy_are_hf_and_peft(runs, tokenizer, references, model):
    samples, docs = runs[model].samples[MC_TASK], task_docs(MC_TASK)
    assert [s["doc"] for s in samples] == docs
    acc, acc_norm = [], []
    for sample, doc in zip(samples, docs, strict=True):
        arguments = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        assert arguments == [(doc["question"], " " + c) for c in doc["choices"]]
        expected, got = mc_reference(references[model], tokenizer, doc), logged(sample)
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=TOLERANCE), doc
        assert [g for _, g in got] == [g for _, g in expected], doc
        lls = [ll for ll, _ in expected]
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
        normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(float(max(range(len(lls)), key=normed.__getitem__) == doc["answer"]))
        assert (sample["acc"], sample["acc_norm"]) == (acc[-1], acc_norm[-1]), doc
    results = runs[model].results["results"][MC_TASK]
    assert results["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert results["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))


# ---- rolling loglikelihood (perplexity) ----
@pytest.mark.parametrize("model", [ADAPTER, BASE])
def test_rolling_loglikelihoods_and_perplexities_are_hf_and_peft(runs, tokenizer, references, model):
    samples, docs = runs[model].samples[ROLLING_TASK], task_docs(ROLLING_TASK)
    assert [s["doc"] for s in samples] == docs
    expected = [rolling_reference(references[model], tokenizer, d["text"], MAX_LENGTH[model]) for d in docs]
    assert [float(s["filtered_resps"][0]) for s in samples] == pytest.approx(expected, abs=TOLERANCE)
    words = sum(len(re.split(r"\s+", d["text"])) for d in docs)
    num_bytes = sum(len(d["text"].encode()) for d in docs)
    results = runs[model].results["results"][ROLLING_TASK]
    assert results["word_perplexity,none"] == pytest.approx(math.exp(-sum(expected) / words), rel=1e-4)
    assert results["byte_perplexity,none"] == pytest.approx(math.exp(-sum(expected) / num_bytes), rel=1e-4)
    assert results["bits_per_byte,none"] == pytest.approx(-sum(expected) / num_bytes / math.log(2), rel=1e-4)


def test_the_base_run_scores_the_longer_texts_in_two_windows(tokenizer):
    """So the rolling checks cover a window that starts mid-text, without the bos token."""
    texts = [d["text"] for d in task_docs(ROLLING_TASK)]
    assert [len(rolling_windows(tokenizer, t, MAX_LENGTH[BASE])) for t in texts] == [1, 2, 2, 2]
    assert [len(rolling_windows(tokenizer, t, MAX_LENGTH[ADAPTER])) for t in texts] == [1, 1, 1, 1]


# ---- is_greedy ----
def test_greedy_continuations_are_told_from_others(runs, tokenizer, references, greedy_docs):
    """A loglikelihood task's acc is is_greedy, which lm-eval reads from the top_logprobs: the base
    model's own greedy tokens are greedy, the same with the second token changed are not."""
    samples = runs[BASE].samples[GREEDY_TASK]
    assert [s["doc"] for s in samples] == greedy_docs
    for sample, doc in zip(samples, greedy_docs, strict=True):
        context = token_ids(tokenizer, doc["context"])
        ll, greedy = score(references[BASE], context, token_ids(tokenizer, doc["continuation"]))
        assert greedy == (sample["doc_id"] % 2 == 0)  # as the docs were made
        [(logged_ll, logged_greedy)] = logged(sample)
        assert (logged_ll, logged_greedy) == (pytest.approx(ll, abs=TOLERANCE), greedy), doc
        assert sample["acc"] == float(greedy)
    assert runs[BASE].results["results"][GREEDY_TASK]["acc,none"] == 0.5


# ---- the checks can fail ----
@pytest.mark.parametrize("model", [ADAPTER, BASE])
def test_the_other_model_scores_every_request_far_from_what_was_logged(runs, tokenizer, references, model):
    """Each run's logged scores are more than APART from the other model's HF (or peft) scores of
    the same requests, so the comparisons above tell the adapter's logprobs from the base's, and
    from any others that far off."""
    other = references[BASE if model == ADAPTER else ADAPTER]
    for sample, doc in zip(runs[model].samples[MC_TASK], task_docs(MC_TASK), strict=True):
        for (ll, _), (other_ll, _) in zip(logged(sample), mc_reference(other, tokenizer, doc), strict=True):
            assert abs(ll - other_ll) > APART, doc
    for sample, doc in zip(runs[model].samples[ROLLING_TASK], task_docs(ROLLING_TASK), strict=True):
        other_ll = rolling_reference(other, tokenizer, doc["text"], MAX_LENGTH[model])
        assert abs(float(sample["filtered_resps"][0]) - other_ll) > APART, doc
