"""docs/gpu_matrix.md from the state file (each row's latest result per machine variant) and the golden values:
one table per variant, each row's largest deviation from its golden values over all iterations."""

from __future__ import annotations

from pathlib import Path

from megatron_patch.harness.matrix_assets import SEED
from megatron_patch.harness.matrix_table import ROWS_FILE, Row, Settings, check_row, deviation, gpus_needed, \
    matrix_rows, tolerance, tolerances

VARIANT_TITLES = {
    "te": "With Transformer Engine (TE layer spec)",
    "local": "Without Transformer Engine (megatron-core's local spec, our fused kernels)",
    "cpu": "CPU (tiny, gloo; the rows CI also checks)",
}
HEADER = ("| configuration | GPUs | device | TE | status | loss it. 1 | loss last | loss vs golden, largest | "
          "grad norm vs golden, largest | tokens/s/GPU | peak GiB | date |")


def _needs(row: Row, rows: dict[str, Row]) -> str:
    gpus = gpus_needed(row, rows)
    return f"needs {gpus} GPU{'s' if gpus > 1 else ''}" + (", TE" if "te" in row.needs else "")


def _deviation_cells(row: Row, result: dict, golden: dict, on_gpu: bool, rows_path: Path) -> tuple[str, str]:
    """The loss and grad norm cells: the largest deviation over every iteration (and over the iterations replayed
    from a CUDA graph), with the iteration and the tolerance."""
    expected = golden.get(row.golden_name)
    if expected is None:
        return f"no golden values for `{row.golden_name}`", ""
    if row.reference is None and expected.get("losses") == result["losses"]:
        return "golden values (this run)", "golden values (this run)" if result.get("grad_norms") else ""
    found = deviation(result, expected)
    tol = tolerance(result["precision"], expected["precision"], on_gpu, rows_path)
    loss = f"{found.loss:+.1e} at it. {found.loss_at} (tol {tol.loss:g}"
    loss += f"; vs `{row.reference}`)" if row.reference else ")"
    if row.first_replayed:
        replayed = [it for it in found.iterations if it >= row.first_replayed]
        if replayed:
            after = deviation(result, expected, replayed)
            loss += f"; replayed it. {replayed[0]}-{replayed[-1]}: {after.loss:+.1e}"
    if found.grad_norm is not None:
        norm = f"{100 * found.grad_norm:+.2f}% at it. {found.grad_norm_at} (tol {100 * tol.grad_norm:g}%)"
    else:
        norm = "not recorded" if not result.get("grad_norms") else "golden values have none"
    return loss, norm


def row_line(row: Row, rows: dict[str, Row], result: dict | None, golden: dict, variant: str,
             rows_path: Path = ROWS_FILE) -> str:
    config = f"`{row.name}`: {row.what}"
    if result is None:
        return f"| {config} | {row.gpus} | | | planned, {_needs(row, rows)} | | | | | | | |"
    status = result["status"]
    first = last = loss_cell = norm_cell = rate = peak = ""
    if status == "ok":
        losses = result["losses"]
        _, problems = check_row(row, result, golden, variant != "cpu", rows_path)
        first = f"{losses['1']:.4f}" if "1" in losses else "skipped"
        last = f"{losses[max(losses, key=int)]:.4f}"
        loss_cell, norm_cell = _deviation_cells(row, result, golden, variant != "cpu", rows_path)
        status = "ok" if not problems else "**check failed**: " + "; ".join(problems)
        if "grad_norms" not in result:  # recorded before every iteration and the grad norms were checked
            status += f"; re-run (losses only, before grad norms were kept; {_needs(row, rows)})"
        rate = f"{result['tokens_per_s_per_gpu']:,}" if result.get("tokens_per_s_per_gpu") else ""
        if rate and result.get("rows_sharing_its_gpus"):
            rate += " (shared)"
        peak = f"{result['peak_gib']:.1f}" if result.get("peak_gib") else ""
    elif status == "refused":
        status = f"refused: {result['message']}"
    else:
        status = f"**failed**: {result['message']}"
    status = status.replace("|", "\\|")
    return (f"| {config} | {row.gpus} | {result['device']} | {result['te']} | {status} | {first} | {last} "
            f"| {loss_cell} | {norm_cell} | {rate} | {peak} | {result['date']} |")


def _preamble(state: dict, settings: Settings, rows_path: Path) -> list[str]:
    s = settings
    lines = [
        "# Every launcher option on GPUs, with and without Transformer Engine",
        "",
        "Written by `python -m benchmarks.gpu_matrix` from `docs/gpu_matrix.json` and the rows and golden values "
        "in `benchmarks/gpu_matrix_rows.yaml` and `benchmarks/gpu_matrix_golden.json` (rerun it, do not edit this "
        "file). Each row is one `examples/qwen2_5/run_mcore_qwen.sh` run (two for `dlc-2x1`: one launcher per "
        "node); its command is listed under the table.",
        "",
        f"**Every row:** Qwen2.5-{s.model_size}, sequence {s.seq_len}, micro-batch {s.micro_batch}, global batch "
        f"{s.global_batch}, {s.iterations} iterations, LR {s.lr:g} (cosine to {s.lr / 10:g}, no warmup), seed "
        f"{SEED}. Pre-training reads a synthetic corpus (3,000 documents: weather, sums, train times), SFT a "
        f"synthetic alpaca set (1,000 records), both tokenized by the project's own toolkits "
        f"(`python -m benchmarks.gpu_matrix --prepare-only`). Every run starts from one converted checkpoint:",
    ]
    lines += [f"{variant}: {how}." for variant, how in sorted(state["checkpoint"].items())]
    tols = ", ".join(f"{name.replace('-cpu', ' on the CPU')} {t.loss:g} / {100 * t.grad_norm:g}%"
                     for name, t in tolerances(rows_path).items())
    return lines + [
        "",
        "**Checks:** every logged iteration's loss and grad norm against the golden values of the row's reference "
        "(the simplest layout of the same data: `base` for pre-training, each SFT data path its own; the resumed "
        "layouts `resume-tp1pp1`, which loads the same saved checkpoint; `dlc-2x1` `dp2`). A reference row (each "
        "precision is one) is checked against its own golden values, which its first run wrote: that deviation "
        "is the run-to-run spread. Allowed, by the coarser precision, loss (absolute, near ln(151936) = 11.93) / "
        f"grad norm (relative): {tols} (where each comes from: the YAML's comments). A precision row's iteration 1 "
        "(before any update) must also match `base`'s within that tolerance; a CUDA-graph row's iterations "
        "replayed from the graph (the 4th on) are shown apart; the loss must fall from iteration 1 to the last. "
        "tokens/s/GPU: tokens over time of the iterations after the fifth, from the launcher's `[qwen]` lines "
        "(a smoke figure, not a benchmark; see docs/benchmarks.md; \"(shared)\": the row ran beside other rows "
        "on its GPUs under `--jobs`); peak: the last rank's peak allocated GPU memory.",
        "",
        "**Status:** ok; refused (the launcher's own message, exit 2, before torchrun); failed (the rank's last "
        "error line); planned (not run: needs more GPUs, or not reached yet); re-run (recorded before the grad "
        "norms were kept: its losses are checked, its grad norms are not).",
    ]


def write_doc(state: dict, golden: dict[str, dict], doc: Path, settings: Settings,
              rows_path: Path = ROWS_FILE) -> None:
    rows = matrix_rows(settings, rows_path)
    by_name = {row.name: row for row in rows}
    results = state["rows"]
    lines = _preamble(state, settings, rows_path)
    for variant in ("te", "local", "cpu"):
        done = {k: v for k, v in results.items() if k.startswith(f"{variant}/")}
        if variant == "cpu" and not done:
            continue
        lines += ["", f"## {VARIANT_TITLES[variant]}", "", HEADER, "|---" * HEADER.count(" | ") + "|---|"]
        for row in rows:
            lines.append(row_line(row, by_name, results.get(f"{variant}/{row.name}"), golden.get(variant, {}),
                                  variant, rows_path))
        commands = [(row.name, results[f"{variant}/{row.name}"].get("command"))
                    for row in rows if f"{variant}/{row.name}" in results]
        if any(command for _, command in commands):
            lines += ["", "Commands ($ASSETS: --assets, $WORK: --work, $CHECKPOINT: the converted checkpoint):", ""]
            lines += [f"- `{name}`: `{command}`" for name, command in commands if command]
    if state["calls"]:
        lines += ["", "## Device calls", ""]
        lines += [f"- {c['date']}, {c['device']}, TE {c['te']}: `{c['command']}` ({c['seconds']:.0f} s)"
                  for c in state["calls"]]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
