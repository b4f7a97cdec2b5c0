"""benchmarks/train_throughput.py's --table maths on hand-written rows: each side's best, ours / HF at best and
at each micro-batch both ran, and the MFU peak lookup."""

from __future__ import annotations

import pytest

import train_throughput as tt


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


def test_an_hf_micro_batch_out_of_memory_after_earlier_runs_gets_a_fresh_process(tmp_path, monkeypatch):
    """The sweep's second micro-batch runs out of memory in the process that ran the first (fragmentation, seen
    at 1.5B mb 16): it is run again alone in a new process, whose row is the one kept; an OOM there ends the sweep."""
    import json
    import sys
    from pathlib import Path

    import torch

    calls = []

    def fake_hf(size, seq_len, micro, global_batch, pure_bf16, steps, warmup, mode):
        calls.append(micro)
        if micro > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.27 GiB")
        return 100.0, 1.0, 0

    fresh = []

    def fake_run(command, check):
        micro = int(command[command.index("--hf-micro-batches") + 1])
        fresh.append(micro)
        status = "ok" if micro == 2 else "OOM"
        rows = [dict(row("HF (a)", micro, 90.0 if status == "ok" else None, "compile default", status),
                     size="tiny", seq_len=64, global_batch=4)]
        Path(command[command.index("--json") + 1]).write_text(json.dumps(rows))

    monkeypatch.setattr(tt, "hf_throughput", fake_hf)
    monkeypatch.setattr(tt.subprocess, "run", fake_run)
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--size", "tiny", "--seq-len", "64", "--global-batch", "4",
                                      "--skip-mcore", "--hf", "a", "--hf-micro-batches", "1,2,4", "--json", str(out)])
    tt.main()
    assert calls == [1, 2, 4] and fresh == [2, 4]  # mb 4 also OOMs in-process, then alone: the sweep ends there
    kept = [(r["micro_batch"], r["status"]) for r in json.loads(out.read_text())]
    assert kept == [(1, "ok"), (2, "ok"), (4, "OOM")]


def test_loss_check_runs_warm_up_over_a_tenth_of_their_iterations(tmp_path, monkeypatch, capsys):
    """Each --mcore run of the loss check gets the same warm-up (a tenth of its iterations unless given) and the
    launcher is asked for it in tokens; the report compares every curve with the first."""
    launched = []

    def fake_launcher(positional, env, out, iters):
        launched.append((positional[22], positional[23], env.get("MP_FP8_RECIPE")))
        losses = [10.0, 9.0] if "MP_FP8_RECIPE" not in env else [10.0, 9.09]
        return "\n".join(f"[qwen] iteration {i + 1} | lm loss: {v:.6E}" for i, v in enumerate(losses))

    monkeypatch.setattr(tt, "run_launcher", fake_launcher)
    parser_args = ["--size", "0.5B", "--seq-len", "128", "--global-batch", "4", "--data", "D", "--tokenizer", "T",
                   "--loss-check-iters", "20", "--mcore", "fused:2", "--mcore", "fused:2:fp8-tensorwise",
                   "--out", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["train_throughput.py", *parser_args])
    tt.main()
    # TRAIN_TOKENS_OR_ITERS and WARMUP_TOKENS_OR_ITERS: 20 and 2 iterations of 4 x 128 tokens
    assert launched == [("10240", "1024", None), ("10240", "1024", "tensorwise")]
    out = capsys.readouterr().out
    assert "loss check: 20 iterations, learning rate 1e-4 after 2 of warm-up" in out
    assert "fused, fp8 tensorwise" in out and "max |difference| from fused 0.0900 (iteration 2, 1.00%)" in out


def test_a_repeated_loss_check_run_is_numbered_not_overwritten():
    taken = {"fused": [], "fused, fp8 tensorwise": []}
    assert tt.repeat_label("fused", taken) == "fused (run 2)"
    taken["fused (run 2)"] = []
    assert tt.repeat_label("fused", taken) == "fused (run 3)"
    assert tt.repeat_label("plain", taken) == "plain"
    assert tt.repeat_label("fused, fp8 blockwise", taken) == "fused, fp8 blockwise"


def test_loss_check_repeats_interleave_and_each_variant_gets_its_mean_and_range(tmp_path, monkeypatch, capsys):
    """--loss-check-repeats 2: A, B, A, B (a drifting machine touches both alike); the per-variant lines average
    the repeats' last-10 means and say whether the two variants' ranges overlap."""
    tails = iter([7.00, 7.20, 7.04, 7.16])  # bf16, fp8, bf16, fp8
    launched = []

    def fake_launcher(positional, env, out, iters):
        launched.append(env.get("MP_FP8_RECIPE", "bf16"))
        last = next(tails)
        return "\n".join(f"[qwen] iteration {i + 1} | lm loss: {v:.6E}" for i, v in enumerate([11.0] + [last] * 10))

    monkeypatch.setattr(tt, "run_launcher", fake_launcher)
    monkeypatch.setattr("sys.argv", ["train_throughput.py", "--data", "D", "--tokenizer", "T", "--out", str(tmp_path),
                                     "--loss-check-iters", "11", "--loss-check-repeats", "2",
                                     "--mcore", "fused:2", "--mcore", "fused:2:fp8-tensorwise"])
    tt.main()
    assert launched == ["bf16", "tensorwise", "bf16", "tensorwise"]
    out = capsys.readouterr().out
    assert "fused (run 2)" in out and "fused, fp8 tensorwise (run 2)" in out
    assert "fused                        2 run(s), last 10 iterations' mean 7.0200 (7.0000-7.0400)" in out
    # (7.20 + 7.16) / 2 = 7.18 against 7.02: +2.28%, and 7.16 > 7.04: apart
    assert "fused, fp8 tensorwise        2 run(s), last 10 iterations' mean 7.1800 (7.1600-7.2000); " \
           "+2.28% against fused, ranges apart" in out


def test_variant_summary_says_when_ranges_overlap():
    lines = tt.variant_summary({"a": [[7.0] * 10, [7.2] * 10], "b": [[7.1] * 10]})
    assert lines[0].split() == ["a", "2", "run(s),", "last", "10", "iterations'", "mean", "7.1000", "(7.0000-7.2000)"]
    assert lines[1].endswith("+0.00% against a, ranges overlap")


def test_an_mcore_run_takes_the_fp8_accuracy_knobs():
    run = tt.McoreRun.parse("fused:4:fp8-tensorwise:bf16-ends-1")
    assert run.env == {"MP_FUSED_KERNELS": "true", "MP_CUDA_GRAPH": "false", "MP_FP8_RECIPE": "tensorwise",
                       "MP_FP8_BF16_LAYERS": "1"}
    assert run.precision == "fp8" and run.label() == "fused, fp8 tensorwise, bf16 ends 1"
    run = tt.McoreRun.parse("fused:4:fp8-tensorwise:fprop-fp32:e4m3")
    assert run.env == {"MP_FUSED_KERNELS": "true", "MP_CUDA_GRAPH": "false", "MP_FP8_RECIPE": "tensorwise",
                       "MP_FP8_FORMAT": "e4m3", "MP_FP8_FPROP_ACCUMULATION": "fp32"}
    assert run.label() == "fused, fp8 tensorwise, e4m3, fp32 forward accumulation"
    for wrong in ("fused:4:bf16-ends-1", "fused:4:fp8-tensorwise:bf16-ends-x", "fused:4:fp8-tensorwise:ends-1",
                  "fused:4:e4m3", "fused:4:fprop-fp32", "fused:4:fp8-tensorwise:e4m3:e4m3"):
        with pytest.raises(SystemExit, match="bf16-ends-N"):
            tt.McoreRun.parse(wrong)
