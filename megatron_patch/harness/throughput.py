"""Throughput as the benchmarks report it: FLOPs per token, MFU against the device's dense bf16 peak, the report
line, the --json result rows both sides write, and the Markdown table of a sweep (each side's best, ours / HF).

FLOP count (per token, forward + backward): Qwen25Size.training_flops_per_token, megatron-core's own count for the
TFLOP/s it logs (6 * the GEMM weights + 6 * layers * hidden * seq_len for the causal attention)."""

from __future__ import annotations

import datetime
import fcntl
import functools
import json
from importlib import metadata
from pathlib import Path

from megatron_patch.hardware import transformer_engine_importable

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s. The first key found in torch.cuda.get_device_name() wins:
# PCIe and NVL cards before their SXM siblings, and "H200" before "H20" (its substring).
PEAK_BF16_DENSE = (
    ("H100 PCIe", 756e12, "NVIDIA H100 PCIe datasheet"),
    ("H100 NVL", 835e12, "NVIDIA H100 NVL datasheet"),
    ("H100", 989e12, "NVIDIA H100 SXM datasheet"),
    ("H200 NVL", 835e12, "NVIDIA H200 NVL datasheet"),
    ("H200", 989e12, "NVIDIA H200 SXM datasheet"),
    ("H800", 989e12, "NVIDIA H800 SXM datasheet"),
    ("H20", 148e12, "NVIDIA H20 datasheet"),
    ("A100", 312e12, "NVIDIA A100 datasheet"),
    ("L40S", 362e12, "NVIDIA L40S datasheet"),
)
OURS, HF_SIDES = "megatron_patch", {"a": "HF (a)", "b": "HF (b)"}  # the rows' "side" (--hf a|b for HF)
NO_FIGURES = {"tokens_per_s_per_gpu": None, "tflops": None, "mfu": None, "peak_gib": None}


@functools.cache
def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def mfu_peak(device: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """The MFU peak in FLOP/s for device (None if not in PEAK_BF16_DENSE) and the header's words for it."""
    if override_tflops:
        return override_tflops * 1e12, f"MFU against {override_tflops:g} TFLOP/s (--peak-tflops)"
    for key, flops, source in PEAK_BF16_DENSE:
        if key in device:
            return flops, f"MFU against {flops / 1e12:.0f} TFLOP/s dense bf16 ({source})"
    return None, f"MFU peak unknown for {device}; pass --peak-tflops"


def mfu(tokens_per_s: float, size, seq_len: int, peak_flops: float | None, frozen_weights: bool = False
        ) -> tuple[float, float | None]:
    """(TFLOP/s per GPU, model FLOPs utilization against peak_flops; None without a peak): the one place MFU is
    computed. frozen_weights: a LoRA run's (no weight gradients of the base)."""
    flops = tokens_per_s * size.training_flops_per_token(seq_len, frozen_weights)
    return flops / 1e12, flops / peak_flops if peak_flops else None


def report(name: str, tokens_per_s: float, size, seq_len: int, peak_gib: float,
           peak_flops: float | None = None, frozen_weights: bool = False) -> dict[str, float | None]:
    """Prints one result line and returns its figures. peak_flops: the MFU peak, by default this device's."""
    if peak_flops is None:
        peak_flops = mfu_peak(device_name())[0]
    tflops, utilization = mfu(tokens_per_s, size, seq_len, peak_flops, frozen_weights)
    shown = f"{100 * utilization:5.1f}%" if utilization is not None else "  n/a "
    print(f"{name:58s} {tokens_per_s:10,.0f} tokens/s/GPU  {tflops:6.1f} TFLOP/s/GPU  MFU {shown}  "
          f"peak {peak_gib:5.1f} GiB", flush=True)
    return {"tokens_per_s_per_gpu": tokens_per_s, "tflops": tflops, "mfu": utilization, "peak_gib": peak_gib}


def versions() -> dict[str, str]:
    """What both sides run on: printed first and stored with every row."""
    import torch

    found = {"torch": torch.__version__}
    for distribution in ("transformers", "megatron-core"):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    if transformer_engine_importable():
        try:
            found["transformer_engine"] = metadata.version("transformer_engine")
        except metadata.PackageNotFoundError:  # carried as a bare folder: no package metadata
            import transformer_engine

            found["transformer_engine"] = getattr(transformer_engine, "__version__", "version unknown")
    found["CUDA runtime"] = torch.version.cuda or "none"
    return found


def comma_list(item_type):
    """An argparse type: comma-separated values of item_type."""
    def parse(text: str) -> list:
        return [item_type(item) for item in text.split(",")]
    parse.__name__ = f"comma-separated {item_type.__name__}"  # argparse names it in its error
    return parse


# ---- result rows (--json) and the table (--table) ----

class Recorder:
    """Prints each result row, keeps it (`rows`) and appends it to `json_path`. MFU counts attention over
    `mfu_seq_len` (default the sequence; packed samples attend over less), and no weight gradients where
    `frozen_weights` (LoRA)."""

    def __init__(self, size_name: str, seq_len: int, global_batch: int, json_path: Path | None = None,
                 peak_tflops: float | None = None, mfu_seq_len: float | None = None, frozen_weights: bool = False):
        from megatron_patch.model_sizes import get_size

        self.size_name, self.size, self.seq_len, self.global_batch = size_name, get_size(size_name), seq_len, \
            global_batch
        self.json_path, self.mfu_seq_len, self.frozen_weights = json_path, mfu_seq_len or seq_len, frozen_weights
        self.stack, self.peak_flops = versions(), mfu_peak(device_name(), peak_tflops)[0]
        self.rows: list[dict] = []

    def __call__(self, side: str, variant: str, micro: int, status: str, rate: float = 0.0, peak_gib: float = 0.0,
                 note: str = "", **extra) -> None:
        """note: why it failed, or what an "ok" row lacked; extra: more fields of the row (printed too)."""
        name = f"{side} {variant}, mb {micro}"
        figures = NO_FIGURES
        if status == "ok":
            figures = report(name, rate, self.size, self.mfu_seq_len, peak_gib, self.peak_flops, self.frozen_weights)
        if status != "ok" or note:
            print(f"{name:58s} {status}{': ' + note if note else ''}", flush=True)
        if extra:
            print(f"{name:58s} " + ", ".join(f"{key} {value}" for key, value in extra.items()), flush=True)
        self.keep({**result_row(side, variant, micro, figures, status, note, self.size_name, self.seq_len,
                                self.global_batch, self.stack), **extra})

    def keep(self, row: dict) -> None:
        """A row as it is (one a child process recorded)."""
        self.rows.append(row)
        if self.json_path:
            append_row(self.json_path, row)


def rows_of_child(command: list[str], cwd: Path) -> list[dict]:
    """The result rows of a benchmark run in a fresh process (`command` plus --json into a scratch file)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        rows_path = Path(scratch) / "rows.json"
        subprocess.run([*command, "--json", str(rows_path)], check=False, cwd=cwd)
        return json.loads(rows_path.read_text()) if rows_path.exists() else []


def result_row(side: str, variant: str, micro: int, figures: dict, status: str, note: str, size: str, seq_len: int,
               global_batch: int, stack: dict[str, str]) -> dict:
    """One --json row: figures as report() returns them (NO_FIGURES where the run failed)."""
    return {"side": side, "variant": variant, "micro_batch": micro, **figures, "status": status, "note": note,
            "size": size, "seq_len": seq_len, "global_batch": global_batch, "device": device_name(),
            "versions": stack, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def append_row(path: Path, row: dict) -> None:
    """Adds row to the JSON list in path; the lock lets two processes write one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        file.seek(0)
        rows = json.loads(file.read() or "[]")
        rows.append(row)
        file.seek(0)
        file.truncate()
        json.dump(rows, file, indent=1)


def best_row(rows: list[dict]) -> dict | None:
    return max((r for r in rows if r["status"] == "ok"), key=lambda r: r["tokens_per_s_per_gpu"], default=None)


def comparisons(rows: list[dict]) -> list[tuple[str, dict | None, dict | None, dict | None]]:
    """(label, ours, HF (a), HF (b)): each side's best row, then the best at each micro-batch ours and an HF
    side both ran."""
    def best_of(side: str, micro: int | None = None) -> dict | None:
        return best_row([r for r in rows if r["side"] == side and micro in (None, r["micro_batch"])])

    def micro_batches(sides) -> set[int]:
        return {r["micro_batch"] for r in rows if r["side"] in sides and r["status"] == "ok"}

    hf_sides = HF_SIDES.values()
    found = [("each side's best", best_of(OURS), *(best_of(side) for side in hf_sides))]
    for micro in sorted(micro_batches([OURS]) & micro_batches(hf_sides)):
        found.append((f"micro-batch {micro}", best_of(OURS, micro), *(best_of(side, micro) for side in hf_sides)))
    return found


def ratio(ours: dict | None, hf: dict | None) -> float | None:
    return ours["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"] if ours and hf else None


def markdown_table(rows: list[dict]) -> str:
    """The sweep (a column per micro-batch, each side's best), the notes of failed runs, and ours / HF."""
    shapes = {(r["size"], r["seq_len"], r["global_batch"]) for r in rows}
    if len(shapes) != 1:
        raise SystemExit(f"--table: the rows mix shapes (size, sequence, global batch) {sorted(shapes)}: "
                         "pass the files of one shape")
    (size, seq_len, global_batch), = shapes
    devices = sorted({r["device"] for r in rows})
    stacks = sorted({" | ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in rows})
    dates = sorted(r["date"] for r in rows)
    lines = [f"Qwen2.5-{size}, sequence {seq_len}, global batch {global_batch}; {', '.join(devices)}; "
             f"{dates[0]} to {dates[-1]}", *(f"versions: {stack}" for stack in stacks)]
    if len(devices) > 1:
        lines.append("WARNING: rows from more than one device; rates compare only on one machine")
    lines += ["", *_sweep_table(rows)]
    notes = [f"- {r['side']} {r['variant']}, mb {r['micro_batch']} {r['status']}: {r['note']}"
             for r in rows if r["note"] and r["status"] != "OOM"]
    lines += ["", *notes] if notes else []
    lines += ["", "| compared at | ours | HF (a) | ours / HF (a) | HF (b) | ours / HF (b) |",
              "|---|---|---|---|---|---|"]
    for label, ours, hf_a, hf_b in comparisons(rows):
        cells = [label, _rate_cell(ours)]
        for hf in (hf_a, hf_b):
            quotient = ratio(ours, hf)
            cells += [_rate_cell(hf), f"**{quotient:.3f}x**" if quotient else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sweep_table(rows: list[dict]) -> list[str]:
    micros = sorted({r["micro_batch"] for r in rows})
    lines = ["| side | variant | " + " | ".join(f"mb {m}" for m in micros) + " | best |",
             "|---|---|" + "---|" * (len(micros) + 1)]
    order = {side: i for i, side in enumerate((OURS, *HF_SIDES.values()))}
    for side, variant in sorted(dict.fromkeys((r["side"], r["variant"]) for r in rows),
                                key=lambda key: order.get(key[0], len(order))):
        mine = [r for r in rows if (r["side"], r["variant"]) == (side, variant)]
        cells = []
        for micro in micros:
            at = [r for r in mine if r["micro_batch"] == micro]
            fastest = best_row(at)
            cells.append(f"{fastest['tokens_per_s_per_gpu']:,.0f}" if fastest else at[-1]["status"] if at else "-")
        fastest = best_row(mine)
        cells.append(f"**{fastest['tokens_per_s_per_gpu']:,.0f}** ({_describe(fastest)})" if fastest else "-")
        lines.append(f"| {side} | {variant} | " + " | ".join(cells) + " |")
    return lines


def _describe(row: dict) -> str:
    utilization = f", {100 * row['mfu']:.1f}% MFU" if row["mfu"] is not None else ""
    return f"mb {row['micro_batch']}{utilization}, {row['peak_gib']:.0f} GiB"


def _rate_cell(row: dict | None) -> str:
    return f"{row['tokens_per_s_per_gpu']:,.0f} ({row['variant']}, mb {row['micro_batch']})" if row else "-"
