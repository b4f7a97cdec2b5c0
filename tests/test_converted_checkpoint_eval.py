"""A checkpoint converted back from Megatron evaluates through LM-Evaluation-Harness/run_eval.sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

CONVERT = REPO_ROOT / "toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh"


def run(cmd, **env):
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_hf_megatron_hf_checkpoint_scores_on_cmmlu_layout_data(tiny_hf_checkpoint, tmp_path):
    from megatron_patch.demo import write_cmmlu_layout_sample

    mcore, back = tmp_path / "mcore", tmp_path / "back"
    run(["bash", CONVERT, "tiny", tiny_hf_checkpoint, mcore, "false", "false", "fp32"])
    run(["bash", CONVERT, "tiny", mcore, back, "true", "false", "bf16", tiny_hf_checkpoint])
    config = json.loads((back / "config.json").read_text())
    assert (config.get("dtype") or config.get("torch_dtype")) == "bfloat16"

    paragraphs = ["人民日报记者报道，今年全国粮食总产量再创新高。农业部门表示，科技进步贡献率持续提升。"] * 8 + \
                 ["新华社北京电，国务院召开常务会议，部署进一步扩大对外开放。会议指出，要优化营商环境。"] * 8
    write_cmmlu_layout_sample(tmp_path / "cmmlu", paragraphs, per_subject=2)
    run([sys.executable, REPO_ROOT / "LM-Evaluation-Harness/prepare_data.py", "--cmmlu", tmp_path / "cmmlu",
         "--out", tmp_path / "data"])
    run(["bash", REPO_ROOT / "LM-Evaluation-Harness/run_eval.sh", back, "cmmlu", "--limit", "2", "--batch_size", "4"],
        EVAL_DATA_DIR=str(tmp_path / "data"), HF_DATASETS_CACHE=str(tmp_path / "hf_cache"))
    results = sorted(back.glob("eval_results/**/results_*.json"))
    assert results, "run_eval.sh wrote no results beside the converted model"
    scores = json.loads(results[-1].read_text())["results"]
    subjects = {k for k in scores if k.startswith("cmmlu_")}
    assert subjects == {"cmmlu_chinese_literature", "cmmlu_journalism"}, scores.keys()
    for name in subjects:
        assert 0.0 <= scores[name]["acc,none"] <= 1.0
