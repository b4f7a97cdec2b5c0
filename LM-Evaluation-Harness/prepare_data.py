"""Turn your own CMMLU / C-Eval download into the local files that run_eval.sh's tasks read.

    python prepare_data.py --cmmlu ~/Downloads/cmmlu --ceval ~/Downloads/ceval-exam.zip --out DATA_DIR

Accepted sources (a folder, a .zip or a .tgz; the folder may also hold the archive's extracted top folder):
  CMMLU:  dev/<subject>.csv, test/<subject>.csv       columns: (index), Question, A, B, C, D, Answer
  C-Eval: dev/<subject>_dev.csv, val/<subject>_val.csv  columns: id, question, A, B, C, D, answer[, explanation]
          (ceval-exam.zip's test/ has no answers and is not used by ceval-valid)

Every cell is kept as the exact text of the CSV: an option `1` stays `1` (not `1.0`), a cell reading `None` stays
`None`, and an empty or missing cell becomes the empty string. Output: DATA_DIR/<benchmark>/<split>/<subject>.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks import BENCHMARKS, Benchmark, default_data_dir

ANSWER_LETTERS = ("A", "B", "C", "D")
ARCHIVE_SUFFIXES = (".zip", ".tgz", ".tar.gz", ".tar")
SEARCH_DEPTH = 3  # how deep below the given folder the dev/ and test/ (or val/) folders may sit


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
    raise SystemExit(
        f"error: no {bench.name} data found in {source}: expected folders {expected} (e.g. {bench.splits[-1]}/{example})"
        f" in it or in a subfolder up to {SEARCH_DEPTH} levels down.\nGet the data with:\n  {bench.download_hint}"
    )


def read_subject_csv(path: Path, bench: Benchmark) -> list[dict[str, str]]:
    # The csv module, not pandas: pandas turns `1` into 1.0 once a column has a gap, and `None`/`NA` into NaN.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [col for col in bench.required_columns if col not in header]
        if missing:
            raise SystemExit(
                f"error: {path} has no column(s) {', '.join(missing)} (its header: {', '.join(header) or 'empty'}).\n"
                f"A {bench.name} CSV needs {', '.join(bench.required_columns)}: is this the right benchmark folder?"
            )
        rows = []
        for row_number, raw in enumerate(reader, start=1):
            row = {col: raw.get(col) or "" for col in (*bench.optional_columns, *bench.required_columns)}
            answer_column = bench.required_columns[-1]
            row[answer_column] = row[answer_column].strip()
            if row[answer_column] not in ANSWER_LETTERS:
                raise SystemExit(
                    f"error: {path}, data row {row_number} (CSV line {reader.line_num}): {answer_column} is "
                    f"{row[answer_column]!r}, expected one of A, B, C, D. Fix or delete that row, then rerun."
                )
            rows.append(row)
    return rows


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def prepare_benchmark(bench: Benchmark, source: Path, data_dir: Path) -> dict[str, dict[str, int]]:
    """Convert one benchmark's download; returns {subject: {split: row count}}."""
    source = source.expanduser().resolve()
    if not source.exists():
        raise SystemExit(f"error: --{bench.name} {source} does not exist.\nGet the data with:\n  {bench.download_hint}")
    with tempfile.TemporaryDirectory(prefix=f"{bench.name}_unpacked_") as unpacked:
        if source.is_file():
            if not source.name.endswith(ARCHIVE_SUFFIXES):
                raise SystemExit(f"error: --{bench.name} {source} is a file but not one of {', '.join(ARCHIVE_SUFFIXES)}.")
            print(f"{bench.name}: unpacking {source}")
            # zip extraction is path-safe already; tar needs the 'data' filter to refuse ../ and absolute members.
            filter_kwargs = {} if source.suffix == ".zip" else {"filter": "data"}
            shutil.unpack_archive(source, unpacked, **filter_kwargs)
            source = Path(unpacked)
        return _convert_folder(bench, find_download_root(source, bench), data_dir)


def _convert_folder(bench: Benchmark, root: Path, data_dir: Path) -> dict[str, dict[str, int]]:
    out_dir = data_dir / bench.name
    if root.is_relative_to(out_dir):
        raise SystemExit(f"error: the {bench.name} download {root} lies inside the output {out_dir}: choose another --out.")
    eval_split, other_splits = bench.splits[-1], bench.splits[:-1]
    subjects = sorted(bench.subject_of(p, eval_split) for p in (root / eval_split).glob("*.csv"))
    if not subjects:
        raise SystemExit(f"error: {root / eval_split} holds no CSV files.\nGet the data with:\n  {bench.download_hint}")

    # Build into a scratch folder and swap it in at the end: a failed run leaves the old data whole, and
    # subjects dropped from a newer download do not linger.
    partial = data_dir / f".{bench.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {}
    print(f"{bench.name}: converting {len(subjects)} subjects from {root}")
    width = len(str(len(subjects)))
    for i, subject in enumerate(subjects, start=1):
        progress = f"  [{i:>{width}}/{len(subjects)}] {subject}:"
        missing = [s for s in other_splits if not bench.csv_path(root, s, subject).is_file()]
        if missing:
            print(f"{progress} SKIPPED, no {', '.join(missing)} file beside its {eval_split} file")
            continue
        counts[subject] = {}
        for split in bench.splits:
            rows = read_subject_csv(bench.csv_path(root, split, subject), bench)
            write_jsonl(rows, partial / split / f"{subject}.jsonl")
            counts[subject][split] = len(rows)
        print(f"{progress} " + ", ".join(f"{n} {s}" for s, n in counts[subject].items()))
    if not counts:
        raise SystemExit(f"error: no {bench.name} subject had all of {', '.join(bench.splits)}; nothing written.")
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    total = sum(c[eval_split] for c in counts.values())
    print(f"{bench.name}: wrote {len(counts)} subjects ({total} {eval_split} questions) to {out_dir}")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for bench in BENCHMARKS.values():
        parser.add_argument(f"--{bench.name}", type=Path, metavar="DIR_OR_ARCHIVE", help=f"your {bench.name} download")
    parser.add_argument("--out", type=Path, default=default_data_dir(),
                        help="data folder run_eval.sh reads (its EVAL_DATA_DIR); default: %(default)s")
    args = parser.parse_args(argv)
    chosen = {name: getattr(args, name) for name in BENCHMARKS if getattr(args, name) is not None}
    if not chosen:
        parser.error("give at least one of " + ", ".join(f"--{name}" for name in BENCHMARKS))
    data_dir = args.out.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, source in chosen.items():
        prepare_benchmark(BENCHMARKS[name], source, data_dir)
    print(f"done. Evaluate with: EVAL_DATA_DIR={data_dir} bash {Path(__file__).parent / 'run_eval.sh'} MODEL_DIR")


if __name__ == "__main__":
    main(sys.argv[1:])
