"""A Megatron checkpoint is refused by LM-Evaluation-Harness/run_eval.sh with the command that converts it back;
that very command's output evaluates, and lm-eval's CMMLU accuracy is exactly what the converted model's own logits
(through transformers, outside lm-eval) score on the same prompts."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO_ROOT

RUN_EVAL = REPO_ROOT / "LM-Evaluation-Harness/run_eval.sh"
# Two real CMMLU subjects (lm-eval knows them by name), three test questions each: (question, options, answer).
QUESTIONS = {
    "journalism": [("新闻的本质属性是？", ("真实性", "时效性", "趣味性", "接近性"), "A"),
                   ("人民日报创刊于哪一年？", ("1946", "1948", "1950", "1956"), "B"),
                   ("消息的结构通常包括导语、主体和？", ("标题", "评论", "背景", "结尾"), "C")],
    "chinese_literature": [("《红楼梦》的作者是？", ("罗贯中", "施耐庵", "吴承恩", "曹雪芹"), "D"),
                           ("“床前明月光”出自谁的诗？", ("李白", "杜甫", "白居易", "王维"), "A"),
                           ("鲁迅的第一部白话小说是？", ("《阿Q正传》", "《狂人日记》", "《故乡》", "《药》"), "B")],
}


def run(cmd, expect: int = 0, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def write_cmmlu_layout(root: Path) -> None:
    """The CMMLU download's layout: dev/ and test/, one CSV per subject, an unnamed index column first."""
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        for subject, rows in QUESTIONS.items():
            with (root / split / f"{subject}.csv").open("w", encoding="utf-8", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                writer.writerows([i, q, *options, answer] for i, (q, options, answer) in enumerate(rows))


def continuation_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), split into tokens the way lm-eval's HF model does (trailing spaces of the
    context move to the continuation; the continuation's tokens are those of the whole after the context's)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    target = whole[len(context_ids):]
    ids = torch.tensor([(context_ids + target)[:-1]])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(log_probs[len(context_ids) - 1 + i, token].item() for i, token in enumerate(target))


def test_megatron_checkpoint_is_refused_and_converted_back_scores_as_its_own_logits(converted_tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The converted checkpoint carries config.json and the tokenizer, yet it is no HF model: refused, with a command.
    refused = run(["bash", RUN_EVAL, converted_tiny], expect=2)
    assert f"MODEL_DIR {converted_tiny} is a Megatron checkpoint" in refused.stderr
    assert "Convert it back to Hugging Face format first" in refused.stderr and "Traceback" not in refused.stderr
    command = next(line.strip() for line in refused.stderr.splitlines() if "run_8xH20.sh" in line)
    back = Path(shlex.split(command)[4])
    run(shlex.split(command))
    config = json.loads((back / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"

    write_cmmlu_layout(tmp_path / "cmmlu")
    run([sys.executable, REPO_ROOT / "LM-Evaluation-Harness/prepare_data.py", "--cmmlu", tmp_path / "cmmlu",
         "--out", tmp_path / "data"])
    results_dir = tmp_path / "results"
    run(["bash", RUN_EVAL, back, "cmmlu", "--batch_size", "4", "--log_samples", "--output_path", results_dir,
         "--model_args", "dtype=float32"],  # fp32 arithmetic on the bf16 weights: no rounding ties below
        EVAL_DATA_DIR=str(tmp_path / "data"), HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    (results_file,) = results_dir.glob("*/results_*.json")
    scores = json.loads(results_file.read_text())["results"]
    assert {k for k in scores if k.startswith("cmmlu_")} == {f"cmmlu_{subject}" for subject in QUESTIONS}

    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(back)
    for subject, rows in QUESTIONS.items():
        (samples_file,) = results_dir.glob(f"*/samples_cmmlu_{subject}_*.jsonl")
        samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
        assert sorted(s["doc_id"] for s in samples) == list(range(len(rows)))
        correct = []
        for sample in samples:
            requests = [sample["arguments"][f"gen_args_{i}"] for i in range(4)]
            ours = [continuation_loglikelihood(model, tokenizer, r["arg_0"], r["arg_1"]) for r in requests]
            theirs = [float(resp[0][0]) for resp in sample["resps"]]
            assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-3, (ours, theirs)
            answer = rows[sample["doc_id"]][2]
            assert int(sample["target"]) == "ABCD".index(answer)
            correct.append(max(range(4), key=ours.__getitem__) == "ABCD".index(answer))
        assert scores[f"cmmlu_{subject}"]["acc,none"] == sum(correct) / len(correct), (subject, correct)
