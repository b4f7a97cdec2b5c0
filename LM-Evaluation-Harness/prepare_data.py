"""Turn your own CMMLU / C-Eval download into the local files that run_eval.sh's tasks read.

    python prepare_data.py --cmmlu ~/Downloads/cmmlu --ceval ~/Downloads/ceval-exam.zip --out DATA_DIR

Accepted sources (a folder, a .zip or a .tgz; the folder may also hold the archive's extracted top folder):
  CMMLU:  dev/<subject>.csv, test/<subject>.csv       columns: (index), Question, A, B, C, D, Answer
  C-Eval: dev/<subject>_dev.csv, val/<subject>_val.csv  columns: id, question, A, B, C, D, answer[, explanation]
          (ceval-exam.zip's test/ has no answers and is not used by ceval-valid)

Every cell is kept as the exact text of the CSV: an option `1` stays `1` (not `1.0`), a cell reading `None` stays
`None`, and an empty option stays the empty string. Output: DATA_DIR/<benchmark>/<split>/<subject>.jsonl.

Malformed rows (unbalanced quotes, more or fewer cells than the header, an empty question, an answer other than
A-D) are listed as FILE:LINE with what is wrong, and nothing is written; --skip-bad-rows leaves them out instead
(each still listed, and counted).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

from eval_benchmarks import BENCHMARKS, Benchmark, default_data_dir
from megatron_patch.atomic_write import StagedFolder, recover_interrupted
from megatron_patch.errors import UserError, report_user_errors

ANSWER_LETTERS = ("A", "B", "C", "D")
ARCHIVE_SUFFIXES = (".zip", ".tgz", ".tar.gz", ".tar")
SEARCH_DEPTH = 3  # how deep below the given folder the dev/ and test/ (or val/) folders may sit
LISTED_PROBLEMS = 20  # bad rows named in full in one error; the rest are counted


def find_download_root(source: Path, bench: Benchmark) -> Path:
    """The folder holding the benchmark's split folders: `source` itself or one of its subfolders."""
    level = [source]
    for _ in range(SEARCH_DEPTH + 1):
        for folder in level:
            if all((folder / split).is_dir() for split in bench.splits):
                return folder
        level = sorted(
            child for folder in level for child in folder.iterdir() if child.is_dir() and child.name != "__MACOSX"
        )
    expected = " and ".join(f"{split}/" for split in bench.splits)
    example = bench.csv_name.format(subject="<subject>", split=bench.splits[-1])
    raise UserError(
        f"error: no {bench.name} data found in {source}: expected folders {expected} (e.g. {bench.splits[-1]}/{example})"
        f" in it or in a subfolder up to {SEARCH_DEPTH} levels down.\nGet the data with:\n  {bench.download_hint}"
    )


def read_subject_csv(path: Path, bench: Benchmark, problems: list[str]) -> list[dict[str, str]]:
    """The rows of one CSV; each malformed row is appended to `problems` as 'FILE:LINE: what' and left out."""
    # The csv module, not pandas: pandas turns `1` into 1.0 once a column has a gap, and `None`/`NA` into NaN.
    # strict: an unbalanced quote is an error, not a cell that silently swallows the rows after it.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            header = [name.strip() for name in next(reader, [])]
        except csv.Error as e:
            raise UserError(f"error: {path}:1: the header is not valid CSV ({e}).") from None
        missing = [col for col in bench.required_columns if col not in header]
        if missing:
            raise UserError(
                f"error: {path} has no column(s) {', '.join(missing)} (its header: {', '.join(header) or 'empty'}).\n"
                f"A {bench.name} CSV needs {', '.join(bench.required_columns)}: is this the right benchmark folder?"
            )
        question_column, answer_column = bench.required_columns[0], bench.required_columns[-1]
        rows, line = [], reader.line_num + 1
        while True:
            try:
                cells = next(reader, None)
            except csv.Error as e:
                problems.append(f"{path}:{line}: not valid CSV ({e}), an unbalanced quote? The rows after it "
                                "cannot be read either")
                break  # the reader cannot resynchronise after a quoting error
            if cells is None:
                break
            where, line = f"{path}:{line}", reader.line_num + 1
            if not cells:  # a blank line is no row
                continue
            if len(cells) != len(header):
                problems.append(f"{where}: {len(cells)} cells, but the header has {len(header)} (an unquoted comma, "
                                "or a missing cell?)")
                continue
            raw = dict(zip(header, cells))
            row = {col: raw.get(col, "") for col in (*bench.optional_columns, *bench.required_columns)}
            row[answer_column] = row[answer_column].strip()
            if not row[question_column].strip():
                problems.append(f"{where}: the {question_column} cell is empty")
            elif row[answer_column] not in ANSWER_LETTERS:
                problems.append(f"{where}: {answer_column} is {row[answer_column]!r}, expected one of A, B, C, D")
            else:
                rows.append(row)
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_benchmark(bench: Benchmark, source: Path, data_dir: Path,
                      skip_bad_rows: bool = False) -> dict[str, dict[str, int]]:
    """Convert one benchmark's download; returns {subject: {split: row count}}."""
    # First, an earlier run killed mid-swap on a file system without an atomic exchange is finished.
    recover_interrupted(data_dir / bench.name)
    source = source.expanduser().resolve()
    if not source.exists():
        raise UserError(f"error: --{bench.name} {source} does not exist.\nGet the data with:\n  {bench.download_hint}")
    with tempfile.TemporaryDirectory(prefix=f"{bench.name}_unpacked_") as unpacked:
        if source.is_file():
            if not source.name.endswith(ARCHIVE_SUFFIXES):
                raise UserError(f"error: --{bench.name} {source} is a file but not one of {', '.join(ARCHIVE_SUFFIXES)}.")
            print(f"{bench.name}: unpacking {source}")
            # zip extraction is path-safe already; tar needs the 'data' filter to refuse ../ and absolute members.
            filter_kwargs = {} if source.suffix == ".zip" else {"filter": "data"}
            shutil.unpack_archive(source, unpacked, **filter_kwargs)
            source = Path(unpacked)
        return _convert_folder(bench, find_download_root(source, bench), data_dir, skip_bad_rows)


def _convert_folder(bench: Benchmark, root: Path, data_dir: Path, skip_bad_rows: bool) -> dict[str, dict[str, int]]:
    out_dir = data_dir / bench.name
    if root.is_relative_to(out_dir):
        raise UserError(f"error: the {bench.name} download {root} lies inside the output {out_dir}: choose another --out.")
    eval_split, other_splits = bench.splits[-1], bench.splits[:-1]
    subjects = sorted(bench.subject_of(p, eval_split) for p in (root / eval_split).glob("*.csv"))
    if not subjects:
        raise UserError(f"error: {root / eval_split} holds no CSV files.\nGet the data with:\n  {bench.download_hint}")

    # Every row is read and checked before anything is written (the CSVs are small: CMMLU is ~12k rows).
    tables: dict[str, dict[str, list[dict[str, str]]]] = {}
    problems: list[str] = []
    print(f"{bench.name}: converting {len(subjects)} subjects from {root}")
    width = len(str(len(subjects)))
    for i, subject in enumerate(subjects, start=1):
        progress = f"  [{i:>{width}}/{len(subjects)}] {subject}:"
        missing = [s for s in other_splits if not bench.csv_path(root, s, subject).is_file()]
        if missing:
            print(f"{progress} SKIPPED, no {', '.join(missing)} file beside its {eval_split} file")
            continue
        splits = {split: read_subject_csv(bench.csv_path(root, split, subject), bench, problems)
                  for split in bench.splits}
        if not splits[eval_split]:
            print(f"{progress} SKIPPED, no usable {eval_split} row")
            continue
        tables[subject] = splits
        print(f"{progress} " + ", ".join(f"{len(rows)} {split}" for split, rows in splits.items()))
    if problems:
        _report_bad_rows(problems, skip_bad_rows)
    if not tables:
        raise UserError(f"error: no {bench.name} subject had all of {', '.join(bench.splits)}; nothing written.")

    # Written to a scratch folder and swapped in whole at the end: a failed or killed run leaves the old data whole,
    # and subjects dropped from a newer download do not linger.
    with StagedFolder(out_dir, "prepare_data") as partial:
        for subject, splits in tables.items():
            for split, rows in splits.items():
                write_jsonl(rows, partial / split / f"{subject}.jsonl")
    total = sum(len(splits[eval_split]) for splits in tables.values())
    print(f"{bench.name}: wrote {len(tables)} subjects ({total} {eval_split} questions) to {out_dir}")
    return {subject: {split: len(rows) for split, rows in splits.items()} for subject, splits in tables.items()}


def _report_bad_rows(problems: list[str], skip: bool) -> None:
    listed = "\n  ".join(problems[:LISTED_PROBLEMS])
    more = f"\n  ... and {len(problems) - LISTED_PROBLEMS} more" if len(problems) > LISTED_PROBLEMS else ""
    if not skip:
        raise UserError(f"error: {len(problems)} malformed row(s); nothing was written:\n  {listed}{more}\n"
                        "Fix or delete these rows and rerun, or pass --skip-bad-rows to leave them out.")
    print(f"warning: left out {len(problems)} malformed row(s) (--skip-bad-rows):\n  {listed}{more}", file=sys.stderr)


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for bench in BENCHMARKS.values():
        parser.add_argument(f"--{bench.name}", type=Path, metavar="DIR_OR_ARCHIVE", help=f"your {bench.name} download")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="leave malformed CSV rows out (each listed as FILE:LINE) instead of stopping")
    parser.add_argument("--out", type=Path, default=default_data_dir(),
                        help="data folder run_eval.sh reads (its EVAL_DATA_DIR); default: %(default)s")
    args = parser.parse_args(argv)
    chosen = {name: getattr(args, name) for name in BENCHMARKS if getattr(args, name) is not None}
    if not chosen:
        parser.error("give at least one of " + ", ".join(f"--{name}" for name in BENCHMARKS))
    data_dir = args.out.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, source in chosen.items():
        prepare_benchmark(BENCHMARKS[name], source, data_dir, args.skip_bad_rows)
    print(f"done. Evaluate with: EVAL_DATA_DIR={data_dir} bash {Path(__file__).parent / 'run_eval.sh'} MODEL_DIR")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
