"""The two Chinese benchmarks of the Qwen2.5 best practice: where their data lives and how to get it.

One table, shared by `prepare_data.py` (which turns a user's download into local files) and `run_eval.py`
(which points lm-eval's own task configs at those files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAI_DATASETS = (
    "https://atp-modelzoo-wlcb-pai.oss-cn-wulanchabu.aliyuncs.com/release/models/pai-megatron-patch/evaluation-datasets"
)


@dataclass(frozen=True)
class Benchmark:
    name: str  # folder under DATA_DIR, and lm-eval's task folder (lm_eval/tasks/<name>)
    group: str  # what the user passes to --tasks; its subject tasks are named "<group>_<subject>"
    splits: tuple[str, ...]  # download folders we convert; named as lm-eval's test/validation and fewshot splits
    csv_name: str  # a subject's file inside a split folder of the download
    required_columns: tuple[str, ...]  # the fields lm-eval's prompt template and target read
    optional_columns: tuple[str, ...]  # kept when present, else written empty, so every split has one schema
    download_hint: str

    def csv_path(self, root: Path, split: str, subject: str) -> Path:
        return root / split / self.csv_name.format(subject=subject, split=split)

    def subject_of(self, csv_file: Path, split: str) -> str:
        return csv_file.stem.removesuffix(f"_{split}") if "{split}" in self.csv_name else csv_file.stem


CMMLU = Benchmark(
    name="cmmlu",
    group="cmmlu",
    splits=("dev", "test"),
    csv_name="{subject}.csv",
    required_columns=("Question", "A", "B", "C", "D", "Answer"),
    optional_columns=(),
    download_hint=(
        f"wget {PAI_DATASETS}/cmmlu.tgz && tar -xzf cmmlu.tgz\n"
        "  (or the data/ folder of https://github.com/haonan-li/CMMLU: dev/ and test/, one CSV per subject)"
    ),
)

CEVAL = Benchmark(
    name="ceval",
    group="ceval-valid",
    # test/ has no answers, and ceval-valid only reads val (scored) and dev (few-shot examples).
    splits=("dev", "val"),
    csv_name="{subject}_{split}.csv",
    required_columns=("question", "A", "B", "C", "D", "answer"),
    optional_columns=("id", "explanation"),  # dev has an explanation column, val does not
    download_hint=(
        f"wget {PAI_DATASETS}/ceval.tgz && tar -xzf ceval.tgz\n"
        "  (or ceval-exam.zip from https://huggingface.co/datasets/ceval/ceval-exam, downloaded by hand)"
    ),
)

BENCHMARKS = {bench.name: bench for bench in (CMMLU, CEVAL)}


def default_data_dir() -> Path:
    return Path(os.environ.get("EVAL_DATA_DIR") or HERE / "data").resolve()


def prepare_command(bench: Benchmark, data_dir: Path) -> str:
    return f"python {HERE / 'prepare_data.py'} --{bench.name} <downloaded folder, .zip or .tgz> --out {data_dir}"
