"""A LoRA fine-tuning run through run_mcore_qwen.sh (SFT on raw JSON, MP_LORA_* knobs, 5 iterations, fp32) over the
Hugging Face folder itself, with MP_SAVE_HF=true; exported by the convertor (MG2HF) as a PEFT adapter folder (what
MP_SAVE_HF wrote, byte for byte) and as merged HF weights: peft loads the adapter over the HF base and gives our
model's logits, the merged weights give the same, and LM-Evaluation-Harness/run_eval.sh scores the adapter as the
merged model scores. The base folder's files are untouched."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from test_converted_checkpoint_eval import QUESTIONS, RUN_EVAL, continuation_loglikelihood, run, write_cmmlu_layout
from test_convertor import RUN_8X, logit_check, safetensors_dict
from test_lora_training import file_digests
from megatron_patch.harness.launcher_runs import clean_environ, launcher_argv, start_launcher, wait_launchers
from training_utils import REPO_ROOT, run_tool

pytestmark = pytest.mark.timeout(900)

ITERATIONS = 5
LOGITS_TOLERANCE = 1e-5  # fp32 on both sides


def export(ckpt, hf_dir, out, *flags: str) -> float:
    """run_8xH20.sh MG2HF of a LoRA run with --check-logits: the largest logit difference between the export
    (through transformers, and peft for an adapter) and our model (base + adapters through megatron's loader)."""
    proc = run_tool(["bash", RUN_8X, "tiny", ckpt, out, "true", "false", "fp32", hf_dir, "--check-logits",
                     "--logits-tolerance", str(LOGITS_TOLERANCE), *flags])
    return logit_check(proc.stdout)[0]


@pytest.fixture(scope="module")
def lora_sft_run(tiny_hf_checkpoint, default_tokenizer_dir, tmp_path_factory) -> dict:
    """The best practice's fine-tuning command on the tiny model with MP_LORA_RANK=8 over the HF folder, then both
    exports."""
    root = tmp_path_factory.mktemp("lora_sft")
    records = [{"instruction": f"第{i}个问题：{i} 加 {i} 等于几？", "output": f"{i} 加 {i} 等于 {2 * i}。"}
               for i in range(48)]
    for split, part in (("train", records[:40]), ("valid", records[40:])):
        (root / f"{split}.json").write_text(json.dumps(part, ensure_ascii=False), encoding="utf-8")
    out = root / "output"
    before = file_digests(tiny_hf_checkpoint)
    args = launcher_argv(iterations=ITERATIONS, warmup_iterations=1, MODEL_SIZE="tiny", BATCH_SIZE=1,
                         GLOBAL_BATCH_SIZE=4, LR=1e-3, MIN_LR=1e-4, SEQ_LEN=128, PR="fp32", SFT=True,
                         SAVE_INTERVAL=ITERATIONS, DATASET_PATH=root / "train.json",
                         VALID_DATASET_PATH=root / "valid.json", PRETRAIN_CHECKPOINT_PATH=tiny_hf_checkpoint,
                         OUTPUT_BASEPATH=out)
    env = clean_environ(MP_DATASET_TYPE="raw", MP_TOKENIZER_PATH=str(default_tokenizer_dir), MP_LORA_RANK="8",
                        MP_LORA_ALPHA="16", MP_SAVE_HF="true")
    proc = start_launcher(args, env, root / "launcher.log")
    (launched,) = wait_launchers([proc], [root / "launcher.log"], None, 600)
    assert launched.returncode == 0, launched.output[-4000:]
    (ckpt,) = (out / "checkpoint").iterdir()
    adapter, merged = root / "adapter", root / "merged"
    differences = {"adapter": export(ckpt, tiny_hf_checkpoint, adapter),
                   "merged": export(ckpt, tiny_hf_checkpoint, merged, "--merge-lora")}
    return dict(ckpt=ckpt, log=launched.output, adapter=adapter, merged=merged, differences=differences,
                saved_hf=out / "hf" / f"iter_{ITERATIONS:07d}", base_digests=(before, file_digests(tiny_hf_checkpoint)))


def test_the_launcher_trains_adapters_over_a_base_it_never_writes(lora_sft_run):
    run_folder = lora_sft_run["ckpt"]
    assert run_folder.name.endswith("-data-raw-lora-r8-a16")
    assert "trainable params: 13,312 || all params: 9,811,520 || trainable%: 0.1357" in lora_sft_run["log"]
    assert (run_folder / "latest_checkpointed_iteration.txt").read_text().strip() == str(ITERATIONS)
    before, after = lora_sft_run["base_digests"]
    assert before and after == before


def test_mp_save_hf_writes_the_convertors_peft_adapter_over_the_hf_base(lora_sft_run, tiny_hf_checkpoint):
    """MP_SAVE_HF=true of a LoRA run is its PEFT adapter folder, naming the HF folder it trained over as its base:
    the convertor's MG2HF of the same checkpoint, byte for byte."""
    saved, converted = lora_sft_run["saved_hf"], lora_sft_run["adapter"]
    files = sorted(p.name for p in converted.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    assert sorted(p.name for p in saved.iterdir()) == files
    assert all((saved / name).read_bytes() == (converted / name).read_bytes() for name in files)
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_hf_checkpoint.resolve())


def test_the_exports_give_our_models_logits_in_transformers_and_peft(lora_sft_run, tiny_hf_checkpoint):
    """Our model (the base checkpoint and the run's adapters, through megatron's loader) against the PEFT adapter
    over the HF base and against the merged weights: fp32 logits within 1e-5; the adapters did change them."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    assert max(lora_sft_run["differences"].values()) <= LOGITS_TOLERANCE, lora_sft_run["differences"]
    config = PeftConfig.from_pretrained(lora_sft_run["adapter"])
    assert (config.r, config.lora_alpha, config.use_dora) == (8, 16, False)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"}
    tokens = torch.randint(0, 151_643, (2, 24), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(tiny_hf_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=tokens).logits
        adapted = PeftModel.from_pretrained(base, lora_sft_run["adapter"]).eval()
        adapter_logits = adapted(input_ids=tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(lora_sft_run["merged"], dtype=torch.float32).eval()
        merged_logits = merged(input_ids=tokens).logits
    # Every tensor peft expects, by PEFT's names; the shared A's came out identical.
    saved = safetensors_dict(lora_sft_run["adapter"])
    assert set(saved) == set(get_peft_model_state_dict(adapted))
    assert torch.equal(saved["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"],
                       saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])
    assert (merged_logits - adapter_logits).abs().max() <= LOGITS_TOLERANCE
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # five iterations moved the model


def test_run_eval_scores_the_adapter_as_the_merged_model(lora_sft_run, tmp_path):
    """lm-eval through run_eval.sh on the adapter folder (base + adapter, peft inside lm-eval) ranks each CMMLU
    question's answers as the merged model's own log-likelihoods do (through transformers, outside lm-eval).

    For a PEFT model lm-eval resizes the embedding to the tokenizer's 151,665 tokens (Qwen2.5 pads it to 151,936),
    which moves every answer's log-likelihood by the same log-normalizer term (ln(151936/151665) = 1.8e-3 at random
    init): the differences between a question's answers, and so the accuracy, stay the model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_cmmlu_layout(tmp_path / "cmmlu")
    run([sys.executable, REPO_ROOT / "LM-Evaluation-Harness/prepare_data.py", "--cmmlu", tmp_path / "cmmlu",
         "--out", tmp_path / "data"])
    results = tmp_path / "results"
    done = run(["bash", RUN_EVAL, lora_sft_run["adapter"], "cmmlu_journalism", "--batch_size", "4", "--log_samples",
                "--output_path", results], EVAL_DATA_DIR=str(tmp_path / "data"), HF_DATASETS_CACHE=str(tmp_path / "c"))
    assert f",peft={lora_sft_run['adapter']}," in done.stdout
    merged = AutoModelForCausalLM.from_pretrained(lora_sft_run["merged"], dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(lora_sft_run["merged"])
    (samples_file,) = results.glob("*/samples_cmmlu_journalism_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text(encoding="utf-8").splitlines()]
    assert len(samples) == len(QUESTIONS["journalism"])
    for sample in samples:
        requests = [sample["arguments"][f"gen_args_{i}"] for i in range(4)]
        ours = [continuation_loglikelihood(merged, tokenizer, r["arg_0"], r["arg_1"]) for r in requests]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        shift = theirs[0] - ours[0]
        assert abs(shift) < 3e-3 and max(abs(t - o - shift) for o, t in zip(ours, theirs)) < 1e-4, (ours, theirs)


def test_merging_a_full_checkpoint_is_refused(converted_tiny, tiny_hf_checkpoint, tmp_path):
    proc = run_tool(["bash", RUN_8X, "tiny", converted_tiny, tmp_path / "out", "true", "false", "fp32",
                     tiny_hf_checkpoint, "--merge-lora"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: --merge-lora: {converted_tiny / 'release'} is a full checkpoint, not a LoRA run's" in proc.stderr
    assert not (tmp_path / "out").exists()
