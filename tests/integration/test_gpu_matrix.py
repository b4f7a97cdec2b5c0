"""The GPU matrix (benchmarks/gpu_matrix_rows.yaml, run by megatron_patch/harness/matrix.py) on the CPU: the rows
cover every launcher value and knob; every row the CPU lacks something for is refused by run_mcore_qwen.sh before
torchrun with its own message (and every other row is accepted); the CPU-runnable rows that no other test trains
pass the matrix's own check against their reference (every iteration, loss and grad norm; tiny, fp32, gloo); the
state file makes the matrix resumable by row and the doc says what each row needs.

Trained here: a checkpoint saved at TP2 continued at TP1 PP2 (against TP1 PP1). Already trained elsewhere, not here:
TP2/PP2/TP2xPP2/DP2+DO against TP1 and PP2 with virtual stages (4 layers) against PP2
(tests/integration/test_training.py), ENV=dlc (tests/integration/test_dlc.py), idxmap/raw/packed SFT through the
launcher (tests/integration/test_best_practice_commands.py).
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_patch.harness.launcher_runs import SCRIPT
from megatron_patch.harness.matrix import Matrix, missing_for, save_state
from megatron_patch.harness.matrix_assets import Assets
from megatron_patch.harness.matrix_doc import write_doc
from megatron_patch.harness.matrix_table import check_row, matrix_rows, settings_table, tolerance
from megatron_patch.launch.positional import POSITIONAL
from megatron_patch.model_sizes import get_size

pytestmark = pytest.mark.timeout(900)

CPU = settings_table()["cpu"]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, gpu_matrix_cpu_assets, converted_tiny) -> Matrix:
    work = tmp_path_factory.mktemp("gpu_matrix_work")
    return Matrix(CPU, gpu_matrix_cpu_assets, work, work / "state.json", checkpoint=converted_tiny, variant="cpu",
                  golden_path=work / "golden.json")


# ---- the matrix itself ----


def test_rows_cover_every_launcher_value_and_knob():
    rows = matrix_rows(settings_table()["gpu"])
    seen: dict[str, set[str]] = {}
    for row in rows:
        for key, value in {**row.args, **row.env}.items():
            seen.setdefault(key, set()).add(value)
    assert {"fp32", "fp16", "fp8"} <= seen["PR"]  # bf16 is the base
    assert {"sel", "full", "offload"} == seen["AC"]
    assert {"static", "auto"} == seen["OPTIMIZER_OFFLOAD"]
    assert {"2"} == seen["TP"] == seen["PP"] == seen["CP"]
    assert {"true"} == seen["SP"] == seen["DO"] == seen["FL"] == seen["SFT"]
    assert {"tensorwise", "blockwise", "mxfp8"} == seen["MP_FP8_RECIPE"]  # delayed is pr-fp8's default
    for knob in ("MP_DATASET_TYPE", "MP_AC_LAYERS", "MP_AC_METHOD", "MP_VP", "MP_SFT_PACKING", "MP_FUSED_KERNELS",
                 "MP_CUDA_GRAPH"):
        assert knob in seen, knob
    assert set(seen) <= set(POSITIONAL) | {k for k in seen if k.startswith("MP_")}
    names = {row.name for row in rows}
    assert {"dp2", "dp2-do", "dlc-2x1", "resume-tp1pp2", "sft-idxmap", "sft-raw", "sft-packed"} <= names
    assert matrix_rows(CPU)[0].name == "base" and "pr-bf16" in {r.name for r in matrix_rows(CPU)} - names
    for row in rows:  # every reference is a row, of the same kind of data
        assert row.golden_name in names and row.first_iteration_of in (None, "base"), row.name
        assert row.sft == next(r for r in rows if r.name == row.golden_name).sft, row.name
    dlc = next(r for r in rows if r.name == "dlc-2x1")
    assert dlc.nodes == 2 and dlc.reference == "dp2"
    assert {r.name for r in rows if r.first_replayed} == {"cuda-graph", "sft-packed-cuda-graph"}


def test_tolerances_widen_with_the_coarser_precision():
    assert tolerance("fp32", "fp32", on_gpu=False).loss == 1e-5
    assert tolerance("bf16", "bf16", on_gpu=True) == tolerance("fp32", "bf16", on_gpu=True)
    assert tolerance("fp8", "bf16", on_gpu=True).loss > tolerance("bf16", "bf16", on_gpu=True).loss


# ---- refusals: what the CPU lacks, named by the launcher before torchrun ----


def dry_run(matrix: Matrix, row) -> subprocess.CompletedProcess:
    """The row's launcher command (each node's, for dlc) with MP_DRY_RUN=1."""
    args = matrix.launcher_args(row, str(matrix.checkpoint()) if row.loads_from else None)
    extra = {"MP_DRY_RUN": "1"}
    if row.nodes > 1:
        extra.update(WORLD_SIZE=str(row.nodes), RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999",
                     KUBERNETES_CONTAINER_RESOURCE_GPU=str(row.gpus // row.nodes))
    return subprocess.run(["sh", str(SCRIPT), *args], env=matrix.launcher_env(row, extra),
                          capture_output=True, text=True, timeout=120)


VP_FITS_TINY = get_size("tiny").num_layers >= 4  # PP=2 with two virtual stages of a layer each
# Rows the launcher should refuse on the CPU but does not yet (what happens instead).
REFUSAL_MISSING: dict[str, str] = {}  # row -> why the launcher should refuse it on the CPU but does not yet


def refusal_case(row):
    marks = [pytest.mark.xfail(strict=True, reason=REFUSAL_MISSING[row.name])] if row.name in REFUSAL_MISSING else []
    return pytest.param(row, id=row.name, marks=marks)


@pytest.mark.parametrize("row", [refusal_case(row) for row in matrix_rows(CPU)])
def test_a_row_is_refused_on_the_cpu_exactly_when_it_needs_what_the_cpu_lacks(matrix, row):
    proc = dry_run(matrix, row)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    missing = missing_for(row, has_gpu=False, has_te=False)
    if row.name == "pp2-vp2" and not VP_FITS_TINY:
        missing = ["MP_VP"]  # tiny's one layer per stage: no second virtual stage (the size, not the CPU)
    if missing:
        assert proc.returncode == 2, output
        assert proc.stderr.startswith("error: ") and "torch.distributed.run" not in output, output
        # It names what is missing (Transformer Engine implies a GPU to the launcher).
        assert any(thing.replace("a GPU", "GPU") in proc.stderr for thing in missing), (missing, proc.stderr)
    else:
        assert proc.returncode == 0 and "torch.distributed.run" in proc.stdout, output


def test_a_refused_row_is_recorded_with_the_launchers_message(matrix):
    result = matrix.run_row(matrix.rows["pr-fp8"])
    assert result["status"] == "refused" and result["message"].startswith("error: PR=fp8 needs Transformer Engine")
    assert json.loads(matrix.state_path.read_text())["rows"]["cpu/pr-fp8"]["status"] == "refused"


# ---- training: the CPU-runnable rows no other test trains ----


def assert_agrees(result: dict, reference: dict, name: str) -> None:
    """The matrix's own check with the reference run here as the golden values: the same loss and grad norm at
    every iteration (same weights, data and optimizer: not only the first), and falling."""
    assert result["status"] == "ok" and reference["status"] == "ok", (result, reference)
    assert sorted(result["losses"], key=int) == [str(i) for i in range(1, CPU.iterations + 1)]
    assert sorted(result["grad_norms"], key=int) == sorted(result["losses"], key=int), result
    row = matrix_rows(CPU)[[r.name for r in matrix_rows(CPU)].index(name)]
    deviation, problems = check_row(row, result, {row.golden_name: reference}, on_gpu=False)
    assert not problems and deviation.iterations == list(range(1, CPU.iterations + 1)), (problems, result, reference)


def test_resumed_in_another_layout_agrees_with_the_simplest(matrix, layout_runs):
    """A checkpoint saved at TP2 PP1 (conftest's tp2 layout run, optimizer included) continued at TP1 PP2 and at
    TP1 PP1 through PRETRAIN_CHECKPOINT_PATH: the same weights give the same losses, every iteration (fp32)."""
    saved = layout_runs["tp2"]["work"] / "ckpt"
    matrix.saved_checkpoints["tp2"] = saved
    with ThreadPoolExecutor(max_workers=2) as pool:  # both at once: much of a launch is single-threaded start-up
        resumed, reference = pool.map(matrix.run_row, (matrix.rows["resume-tp1pp2"], matrix.rows["resume-tp1pp1"]))
    assert_agrees(resumed, reference, "resume-tp1pp2")
    for name in ("resume-tp1pp2", "resume-tp1pp1"):  # both loaded the TP2 run's last iteration
        log = (matrix.out_dir(matrix.rows[name]) / "launcher.log").read_text()
        assert f"successfully loaded checkpoint from {saved} " in log, name


def test_sft_over_two_processes_agrees_with_one(matrix):
    """SFT on raw JSON packed (TP=2, DP=2) and on an SFT idxmap (TP=2), each against its one-process reference,
    every iteration (fp32)."""
    names = ("sft-packed", "sft-packed-tp2", "sft-packed-dp2", "sft-idxmap", "sft-idxmap-tp2")
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(names, pool.map(matrix.run_row, [matrix.rows[name] for name in names])))
    for name in ("sft-packed-tp2", "sft-packed-dp2", "sft-idxmap-tp2"):
        assert_agrees(results[name], results[matrix.rows[name].reference], name)


# ---- resumable by row; the doc ----


def test_rows_done_are_skipped_and_the_doc_says_what_each_needs(tmp_path, monkeypatch):
    state, golden = tmp_path / "state.json", tmp_path / "golden.json"
    done = dict(status="ok", losses={"1": 11.93, "2": 11.5, "3": 11.0}, grad_norms={"1": 5.0, "2": 4.0, "3": 3.0},
                tokens_per_s_per_gpu=1000, peak_gib=None, device="CPU", te="none", date="2026-11-30",
                precision="fp32", command="sh run_mcore_qwen.sh ...")
    stalled = dict(done, losses={"1": 11.93, "2": 11.96, "3": 11.97})
    before_grad_norms = {k: v for k, v in done.items() if k != "grad_norms"}  # a result recorded before 2026-12-07
    save_state({"rows": {"cpu/base": done, "cpu/ac-sel": stalled, "cpu/ac-full": before_grad_norms},
                "settings": {}, "checkpoint": {}, "calls": []}, state)
    golden.write_text(json.dumps({"cpu": {"base": done}}))
    matrix = Matrix(CPU, Assets(tmp_path), tmp_path, state, checkpoint=tmp_path, variant="cpu", golden_path=golden)
    ran = []
    monkeypatch.setattr(matrix, "run_row", lambda row, gpus: ran.append(row.name) or {})
    matrix.run(matrix.select("base,ac-*,tp2-pp2"), budget_s=600)
    assert ran == ["ac-full-block", "ac-offload"]  # base, ac-sel, ac-full are done; tp2-pp2 needs 4 processes
    write_doc(json.loads(state.read_text()), json.loads(golden.read_text()), tmp_path / "doc.md", CPU)
    cpu_table = (tmp_path / "doc.md").read_text().split("## CPU")[1].splitlines()

    def line(name: str) -> str:
        return next(line for line in cpu_table if line.startswith(f"| `{name}`"))

    assert "loss did not fall" in line("ac-sel") and "+9.7e-01 at it. 3 (tol 1e-05; vs `base`)" in line("ac-sel")
    assert "loss at iteration 3 +9.70e-01 from the golden values, beyond 1e-05" in line("ac-sel")
    assert "| ok |" in line("base") and "golden values (this run)" in line("base")
    assert "re-run (losses only" in line("ac-full") and "| not recorded |" in line("ac-full")
    assert "| 4 | | | planned, needs 4 GPUs |" in line("tp2-pp2")
    assert "| 1 | | | planned, needs 1 GPU, TE |" in line("pr-fp8")
    with pytest.raises(SystemExit, match="--rows nope matches no row"):
        matrix.select("base,nope")


def test_rows_run_concurrently_on_the_least_busy_gpus_and_a_resume_waits_for_its_save(tmp_path, monkeypatch):
    import threading
    import time

    matrix = Matrix(CPU, Assets(tmp_path), tmp_path, tmp_path / "state.json", checkpoint=tmp_path, variant="cpu",
                    golden_path=tmp_path / "golden.json")
    monkeypatch.setattr(matrix, "processes_available", lambda: 2)
    lock = threading.Lock()
    busy: dict[int, int] = {0: 0, 1: 0}
    most_busy = {0: 0, 1: 0}
    started: list[tuple[str, list[int]]] = []
    saved_when: dict[str, float] = {}

    ended: dict[str, float] = {}

    def fake_run_row(row, gpus):
        with lock:
            if row.reference:  # the golden values it is checked against are written by its reference's run
                assert row.reference in ended, f"{row.name} started before {row.reference} ended"
            started.append((row.name, gpus))
            for gpu in gpus:
                busy[gpu] += 1
                most_busy[gpu] = max(most_busy[gpu], busy[gpu])
            if row.loads_from:
                assert row.loads_from in saved_when, f"{row.name} started before {row.loads_from} saved"
        time.sleep(0.3)
        with lock:
            for gpu in gpus:
                busy[gpu] -= 1
        if row.saves:
            matrix.saved_checkpoints[row.name] = tmp_path / row.name
            saved_when[row.name] = time.time()
        result = matrix.record(row, dict(status="ok", losses={"1": 11.9, "2": 11.0}, command="", seconds=0.3))
        ended[row.name] = time.time()
        return result

    monkeypatch.setattr(matrix, "run_row", fake_run_row)
    rows = matrix.select("base,ac-sel,ac-full,fl-true,tp2,resume-tp1pp2,tp2-pp2")
    matrix.run(rows, budget_s=600, jobs=4)
    names = [name for name, _ in started]
    # tp2-pp2 needs 4 GPUs: planned; resume-tp1pp2's reference resume-tp1pp1 has no golden values: run too, after
    # tp2 saved, and its result written as its golden values.
    assert sorted(names) == sorted(["base", "ac-sel", "ac-full", "fl-true", "tp2", "resume-tp1pp1",
                                    "resume-tp1pp2"])
    assert max(most_busy.values()) <= 2 and min(most_busy.values()) >= 1  # 4 jobs on 2 GPUs: 2 per GPU at most
    assert all(len(gpus) == 2 for name, gpus in started if name in ("tp2", "resume-tp1pp2"))
    state = json.loads((tmp_path / "state.json").read_text())
    assert {k for k, v in state["rows"].items() if v["status"] == "ok"} == {f"cpu/{n}" for n in names}
    assert "rows_sharing_its_gpus" in state["rows"]["cpu/ac-sel"]
    assert sorted(json.loads((tmp_path / "golden.json").read_text())["cpu"]) == ["base", "resume-tp1pp1"]
