"""The throughput benchmarks' harness (megatron_patch/harness/): the --table maths on hand-written rows (each side's
best, ours / HF at best and at each micro-batch both ran), the MFU peak lookup, the HF micro-batch sweep, the
--mcore run variants and the loss check."""

from __future__ import annotations

import pytest

from megatron_patch.harness import hf_baseline, mcore_runs
from megatron_patch.harness import throughput as tt


def row(side: str, micro: int, rate: float | None, variant: str = "v", status: str = "ok", note: str = "") -> dict:
    return {"side": side, "variant": variant, "micro_batch": micro, "tokens_per_s_per_gpu": rate, "mfu": None,
            "peak_gib": 10.0, "status": status, "note": note, "size": "1.5B", "seq_len": 2048, "global_batch": 32,
            "device": "NVIDIA H200", "versions": {"torch": "2"}, "date": "2026-12-01T00:00:00+00:00"}


ROWS = [
    row("megatron_patch", 4, 50.0), row("megatron_patch", 8, 60.0), row("megatron_patch", 16, None, status="OOM"),
    row("HF (a)", 4, 40.0, "compile default"), row("HF (a)", 8, 30.0, "compile default"),
    row("HF (a)", 4, 45.0, "compile reduce-overhead"),
    row("HF (a)", 8, None, "compile reduce-overhead", "failed", "RuntimeError: capture failed"),
    row("HF (b)", 16, 48.0),
]


def test_best_skips_oom_and_failed_rows():
    assert tt.best_row(ROWS)["tokens_per_s_per_gpu"] == 60.0
    assert tt.best_row([r for r in ROWS if r["status"] != "ok"]) is None


def test_ratios_at_best_and_at_equal_micro_batch():
    found = {label: (ours, a, b) for label, ours, a, b in tt.comparisons(ROWS)}
    ours, hf_a, hf_b = found["each side's best"]
    assert (ours["micro_batch"], hf_a["variant"], hf_b["micro_batch"]) == (8, "compile reduce-overhead", 16)
    assert tt.ratio(ours, hf_a) == 60.0 / 45.0 and tt.ratio(ours, hf_b) == 60.0 / 48.0
    # micro-batch 16: ours ran out of memory there, so it is not a micro-batch both ran
    assert list(found) == ["each side's best", "micro-batch 4", "micro-batch 8"]
    ours, hf_a, hf_b = found["micro-batch 8"]
    assert tt.ratio(ours, hf_a) == 2.0 and tt.ratio(ours, hf_b) is None


def test_table_shows_sweep_best_and_failures():
    table = tt.markdown_table(ROWS)
    assert "| megatron_patch | v | 50 | 60 | OOM | **60** (mb 8, 10 GiB) |" in table
    assert "| HF (a) | compile reduce-overhead | 45 | failed | - | **45** (mb 4, 10 GiB) |" in table
    assert "- HF (a) compile reduce-overhead, mb 8 failed: RuntimeError: capture failed" in table
    assert "| each side's best | 60 (v, mb 8) | 45 (compile reduce-overhead, mb 4) | **1.333x** | 48 (v, mb 16) |" \
        " **1.250x** |" in table


def test_peak_lookup_by_device_name():
    assert tt.mfu_peak("NVIDIA H200")[0] == 989e12  # not H20's, whose key it contains
    assert tt.mfu_peak("NVIDIA H20")[0] == 148e12
    assert tt.mfu_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert tt.mfu_peak("NVIDIA GeForce RTX 4090") == (None, "MFU peak unknown for NVIDIA GeForce RTX 4090; pass "
                                                      "--peak-tflops")
    assert tt.mfu_peak("NVIDIA GeForce RTX 4090", 165.2)[0] == 165.2e12


def test_mfu_is_model_flops_over_the_peak():
    from megatron_patch.model_sizes import get_size

    size = get_size("1.5B")
    tflops, utilization = tt.mfu(50_000, size, 2048, 989e12)
    assert tflops == 50_000 * size.training_flops_per_token(2048) / 1e12 and utilization == tflops / 989
    assert tt.mfu(50_000, size, 2048, None)[1] is None
    # LoRA: the frozen base takes no weight-gradient GEMMs, 2 of the 6 FLOPs per weight and token; attention stays
    weights = size.training_flops_per_token(0) / 6
    frozen = tt.mfu(50_000, size, 2048, 989e12, frozen_weights=True)[0]
    assert frozen == pytest.approx(tflops - 50_000 * 2 * weights / 1e12, rel=1e-12) and 0.6 < frozen / tflops < 0.7


def test_an_hf_micro_batch_out_of_memory_after_earlier_runs_gets_a_fresh_process():
    """The sweep's second micro-batch runs out of memory in the process that ran the first (fragmentation, seen
    at 1.5B mb 16): it is run again alone in a new process, whose row is the one kept; an OOM there ends the sweep."""
    import weakref

    import torch

    measured, alone, kept, failed_models = [], [], [], []

    class Model:  # stands for what a failed run holds on the GPU
        pass

    def measure(micro):
        measured.append(micro)
        model = Model()
        failed_models.append(weakref.ref(model))
        if micro > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB")
        return 100.0, 1.0, 0

    def measure_alone(micro):  # the fresh process records its own row
        assert failed_models[-1]() is None, "the failed run's frames still hold its model while the fresh one runs"
        alone.append(micro)
        kept.append((micro, "ok" if micro == 2 else "OOM"))
        return kept[-1][1]

    ran = hf_baseline.sweep_micro_batches([1, 2, 4], measure, measure_alone,
                                          lambda micro, status, *rest, **note: kept.append((micro, status)), False)
    assert ran and measured == [1, 2, 4] and alone == [2, 4]  # mb 4 also OOMs in-process, then alone: the end
    assert kept == [(1, "ok"), (2, "ok"), (4, "OOM")]
    kept.clear()  # a first run that fails is a row, and the sweep ends there without a fresh process
    assert not hf_baseline.sweep_micro_batches([2, 4], measure, measure_alone,
                                               lambda micro, status, **note: kept.append((micro, status, note)),
                                               False)
    assert kept == [(2, "OOM", {"note": "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.27 GiB"})]


def test_loss_check_runs_warm_up_over_a_tenth_of_their_iterations(tmp_path, monkeypatch, capsys):
    """Each --mcore run of the loss check gets the same warm-up (a tenth of its iterations unless given) and the
    launcher is asked for it in tokens; the report compares every curve with the first."""
    launched = []

    def fake_launcher(positional, env, out, iters):
        launched.append((positional[22], positional[23], env.get("MP_FP8_RECIPE")))
        losses = [10.0, 9.0] if "MP_FP8_RECIPE" not in env else [10.0, 9.09]
        return "\n".join(f" iteration {i + 1}/ 20 | lm loss: {v:.6E} |" for i, v in enumerate(losses))

    monkeypatch.setattr(mcore_runs, "run_launcher", fake_launcher)
    runs = [mcore_runs.McoreRun.parse("fused:2"), mcore_runs.McoreRun.parse("fused:2:fp8-tensorwise")]
    mcore_runs.check_losses(runs, 1, 20, None, lambda run, label, warmup: mcore_runs.megatron_run(
        "0.5B", 128, run.micro, 4, "D", "T", 20, tmp_path / label, run.env, precision=run.precision,
        warmup_iters=warmup))
    # TRAIN_TOKENS_OR_ITERS and WARMUP_TOKENS_OR_ITERS: 20 and 2 iterations of 4 x 128 tokens
    assert launched == [("10240", "1024", None), ("10240", "1024", "tensorwise")]
    out = capsys.readouterr().out
    assert "loss check: 20 iterations, learning rate 1e-4 after 2 of warm-up" in out
    assert "fused, fp8 tensorwise" in out and "max |difference| from fused 0.0900 (iteration 2, 1.00%)" in out


def test_a_repeated_loss_check_run_is_numbered_not_overwritten():
    taken = {"fused": [], "fused, fp8 tensorwise": []}
    assert mcore_runs.repeat_label("fused", taken) == "fused (run 2)"
    taken["fused (run 2)"] = []
    assert mcore_runs.repeat_label("fused", taken) == "fused (run 3)"
    assert mcore_runs.repeat_label("plain", taken) == "plain"
    assert mcore_runs.repeat_label("fused, fp8 blockwise", taken) == "fused, fp8 blockwise"


def test_loss_check_repeats_interleave_and_each_variant_gets_its_mean_and_range(capsys):
    """Two repeats: A, B, A, B (a drifting machine touches both alike); the per-variant lines average the repeats'
    last-10 means and say whether the two variants' ranges overlap."""
    tails = iter([7.00, 7.20, 7.04, 7.16])  # bf16, fp8, bf16, fp8
    launched = []

    def launch(run, label, warmup):
        launched.append((run.env.get("MP_FP8_RECIPE", "bf16"), warmup))
        last = next(tails)
        return "\n".join(f" iteration {i + 1}/ 11 | lm loss: {v:.6E} |" for i, v in enumerate([11.0] + [last] * 10))

    runs = [mcore_runs.McoreRun.parse("fused:2"), mcore_runs.McoreRun.parse("fused:2:fp8-tensorwise")]
    mcore_runs.check_losses(runs, 2, 11, 0, launch)
    assert launched == [("bf16", 0), ("tensorwise", 0), ("bf16", 0), ("tensorwise", 0)]
    out = capsys.readouterr().out
    assert "fused (run 2)" in out and "fused, fp8 tensorwise (run 2)" in out
    assert "fused                        2 run(s), last 10 iterations' mean 7.0200 (7.0000-7.0400)" in out
    # (7.20 + 7.16) / 2 = 7.18 against 7.02: +2.28%, and 7.16 > 7.04: apart
    assert "fused, fp8 tensorwise        2 run(s), last 10 iterations' mean 7.1800 (7.1600-7.2000); " \
           "+2.28% against fused, ranges apart" in out


def test_variant_summary_says_when_ranges_overlap():
    lines = mcore_runs.variant_summary({"a": [[7.0] * 10, [7.2] * 10], "b": [[7.1] * 10]})
    assert lines[0].split() == ["a", "2", "run(s),", "last", "10", "iterations'", "mean", "7.1000", "(7.0000-7.2000)"]
    assert lines[1].endswith("+0.00% against a, ranges overlap")


def test_an_mcore_run_takes_the_fp8_accuracy_knobs():
    run = mcore_runs.McoreRun.parse("fused:4:fp8-tensorwise:bf16-ends-1")
    assert run.env == {"MP_FUSED_KERNELS": "true", "MP_CUDA_GRAPH": "false", "MP_FP8_RECIPE": "tensorwise",
                       "MP_FP8_BF16_LAYERS": "1"}
    assert run.precision == "fp8" and run.label() == "fused, fp8 tensorwise, bf16 ends 1"
    run = mcore_runs.McoreRun.parse("fused:4:fp8-tensorwise:fprop-fp32:e4m3")
    assert run.env == {"MP_FUSED_KERNELS": "true", "MP_CUDA_GRAPH": "false", "MP_FP8_RECIPE": "tensorwise",
                       "MP_FP8_FORMAT": "e4m3", "MP_FP8_FPROP_ACCUMULATION": "fp32"}
    assert run.label() == "fused, fp8 tensorwise, e4m3, fp32 forward accumulation"
    for wrong in ("fused:4:bf16-ends-1", "fused:4:fp8-tensorwise:bf16-ends-x", "fused:4:fp8-tensorwise:ends-1",
                  "fused:4:e4m3", "fused:4:fprop-fp32", "fused:4:fp8-tensorwise:e4m3:e4m3"):
        with pytest.raises(SystemExit, match="bf16-ends-N"):
            mcore_runs.McoreRun.parse(wrong)


def test_launcher_runs_stop_at_oom_fall_back_from_the_graph_and_keep_to_the_budget(tmp_path):
    """run_mcore_variants: a failed run's status and cause come from its logs; a larger micro-batch of a variant
    that ran out of memory is not launched; a graphed run that fails otherwise runs again without the graph, and
    so do the graphed runs after it; no run starts once the budget says no."""
    launched, recorded = [], []

    def launch(run, out):
        launched.append((run.micro, run.graph))
        (out / "log").mkdir(parents=True)
        if run.micro == 4:
            (out / "log" / "node0.log").write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate\n")
            raise SystemExit("megatron run failed")
        if run.graph:
            (out / "megatron.log").write_text("RuntimeError: capture failed\nChildFailedError: ranks failed\n")
            raise SystemExit("megatron run failed")
        return "log"

    starts = iter([True] * 3 + [False])  # asked before each launch not skipped for memory
    mcore_runs.run_mcore_variants(["fused:2:graph", "fused:4:graph", "fused:8", "fused:1"], launch, tmp_path,
                                  lambda *row, **fields: recorded.append((row, fields)),
                                  lambda log: (10.0, 2.0, {"host_peak_gib": 3.0}), "packed SFT",
                                  graph_fallback=True, may_start=lambda: next(starts))
    assert launched == [(2, True), (2, False), (4, False)]  # fused:8 skipped (OOM at 4), fused:1 out of time
    statuses = [(row[2], row[3], fields.get("note", "")) for row, fields in recorded]
    assert statuses == [(2, "failed", "RuntimeError: capture failed"), (2, "ok", ""),
                        (4, "OOM", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate")]
    assert recorded[1] == (("megatron_patch", "fused, local spec, packed SFT", 2, "ok", 10.0, 2.0),
                           {"host_peak_gib": 3.0})
