"""The GPU matrix's check (megatron_patch/harness/matrix_table.py) on hand-made curves: every logged iteration's
loss and grad norm against the golden values, so a row that agrees at iteration 1 and drifts later fails; the
CUDA-graph rows must have iterations replayed from the graph; the rows and golden values read from the data files."""

from __future__ import annotations

import json

import pytest

from megatron_patch.harness.matrix_table import CUDA_GRAPH_FIRST_REPLAYED, GOLDEN_FILE, Row, check_row, \
    golden_rows, keep_golden, load_golden, matrix_rows, settings_table, tolerance

GPU = settings_table()["gpu"]
BF16 = tolerance("bf16", "bf16", on_gpu=True)


def curve(losses: list[float], grad_norms: list[float] | None = None, precision: str = "bf16") -> dict:
    result = {"status": "ok", "precision": precision, "losses": {str(i + 1): v for i, v in enumerate(losses)}}
    if grad_norms is not None:
        result["grad_norms"] = {str(i + 1): v for i, v in enumerate(grad_norms)}
    return result


BASE = curve([12.06, 10.83, 9.28, 8.57, 8.23, 8.07, 7.93, 7.83], [9.0, 7.5, 6.1, 5.2, 4.8, 4.4, 4.1, 3.9])
ROW = Row("ac-sel", "AC=sel", {"AC": "sel"})


def test_a_row_equal_to_its_golden_values_passes():
    deviation, problems = check_row(ROW, json.loads(json.dumps(BASE)), {"base": BASE}, on_gpu=True)
    assert problems == [] and deviation.iterations == list(range(1, 9)) and deviation.loss == 0.0


def test_one_later_iteration_off_fails_the_row_though_iteration_1_agrees():
    drifted = json.loads(json.dumps(BASE))
    drifted["losses"]["4"] += 2 * BF16.loss  # a wrong optimizer step shows only after the first update
    deviation, problems = check_row(ROW, drifted, {"base": BASE}, on_gpu=True)
    assert deviation.loss_at == 4 and deviation.loss == pytest.approx(2 * BF16.loss)
    assert problems == [f"loss at iteration 4 {2 * BF16.loss:+.2e} from the golden values, beyond {BF16.loss:g}"]
    within = json.loads(json.dumps(BASE))
    within["losses"]["4"] += BF16.loss / 2
    assert check_row(ROW, within, {"base": BASE}, on_gpu=True)[1] == []


def test_a_later_grad_norm_off_fails_the_row():
    drifted = json.loads(json.dumps(BASE))
    drifted["grad_norms"]["6"] *= 1 + 2 * BF16.grad_norm
    deviation, problems = check_row(ROW, drifted, {"base": BASE}, on_gpu=True)
    assert deviation.grad_norm_at == 6 and len(problems) == 1 and "grad norm at iteration 6" in problems[0]


def test_missing_iterations_fail_and_a_graph_row_needs_its_replayed_ones():
    short = curve([12.06, 10.83, 9.28], [9.0, 7.5, 6.1])
    problems = check_row(ROW, short, {"base": BASE}, on_gpu=True)[1]
    assert problems == ["no loss at iteration(s) 4, 5, 6, 7, 8, which the golden values have"]
    graph = Row("cuda-graph", "MP_CUDA_GRAPH=true", env={"MP_CUDA_GRAPH": "true"})
    assert graph.first_replayed == CUDA_GRAPH_FIRST_REPLAYED == 4
    problems = check_row(graph, short, {"base": curve([12.06, 10.83, 9.28], [9.0, 7.5, 6.1])}, on_gpu=True)[1]
    assert problems == ["no iteration from 4 on (replayed from the CUDA graph) was compared"]
    stale = json.loads(json.dumps(BASE))
    stale["losses"]["7"] = stale["losses"]["4"]  # a graph replaying stale inputs repeats an earlier batch's loss
    assert "loss at iteration 7" in check_row(graph, stale, {"base": BASE}, on_gpu=True)[1][0]


def test_a_precision_row_matches_its_own_golden_values_and_bases_first_iteration():
    fp32 = Row("pr-fp32", "PR=fp32", {"PR": "fp32"}, reference=None, first_iteration_of="base")
    own = curve([12.0616, 10.82, 9.278, 8.57, 8.22, 8.06, 7.93, 7.82], precision="fp32")
    assert check_row(fp32, own, {"base": BASE, "pr-fp32": own}, on_gpu=True)[1] == []
    off = dict(own, losses={**own["losses"], "1": BASE["losses"]["1"] + 2 * BF16.loss})
    problems = check_row(fp32, off, {"base": BASE, "pr-fp32": own}, on_gpu=True)[1]
    assert any(p.startswith("iteration-1 loss") and "from base's" in p for p in problems), problems
    assert check_row(fp32, own, {}, on_gpu=True) == (None, [])  # no golden values yet: its first run writes them


def test_the_rows_and_golden_values_on_file_agree():
    rows = matrix_rows(GPU)
    golden = load_golden()
    assert set(golden) == {"te", "local"}, GOLDEN_FILE
    for variant, entries in golden.items():
        assert set(entries) <= golden_rows(rows), (variant, set(entries) - golden_rows(rows))
        for name, entry in entries.items():
            assert sorted(entry["losses"], key=int) == [str(i) for i in range(1, GPU.iterations + 1)], name


def test_golden_values_are_written_once_unless_blessed(tmp_path):
    path = tmp_path / "golden.json"
    first = dict(curve([2.0, 1.0]), device="CPU", date="2026-12-07")
    assert keep_golden(path, "cpu", "base", first)
    assert not keep_golden(path, "cpu", "base", dict(first, losses={"1": 3.0}))
    assert load_golden(path)["cpu"]["base"]["losses"] == {"1": 2.0, "2": 1.0}
    assert keep_golden(path, "cpu", "base", dict(first, losses={"1": 3.0}), replace=True)
    assert load_golden(path)["cpu"]["base"]["losses"] == {"1": 3.0}
