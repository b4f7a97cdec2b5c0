"""The GPU matrix as data: its settings, tolerances and rows (benchmarks/gpu_matrix_rows.yaml), the golden values
of its reference rows (benchmarks/gpu_matrix_golden.json), and the check of a row's result against them at every
logged iteration, loss and grad norm."""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from megatron_patch.model_sizes import get_size

REPO = Path(__file__).resolve().parents[2]
ROWS_FILE = REPO / "benchmarks" / "gpu_matrix_rows.yaml"
GOLDEN_FILE = REPO / "benchmarks" / "gpu_matrix_golden.json"
PRECISION_ORDER = ("fp32", "bf16", "fp16", "fp8")
# MP_CUDA_GRAPH's full-iteration graph is captured and first replayed at this iteration: megatron-core 0.19.2's
# cuda_graph_warmup_steps (3) eager iterations come first.
CUDA_GRAPH_FIRST_REPLAYED = 4


@dataclass(frozen=True)
class Settings:
    """What every row shares; rows change launcher arguments and knobs on top of it."""

    name: str
    model_size: str
    seq_len: int
    micro_batch: int
    global_batch: int
    iterations: int
    lr: float
    precision: str  # the base's
    stop_after_last_iteration: bool  # skip the final save and validation (tens of seconds at 0.5B)
    row_timeout_s: int


@dataclass(frozen=True)
class Tolerance:
    loss: float  # absolute
    grad_norm: float  # relative


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    args: dict[str, str] = field(default_factory=dict)  # launcher positional arguments that differ from the base
    env: dict[str, str] = field(default_factory=dict)  # launcher knobs
    gpus: int = 1  # processes: GPUs on a GPU machine
    reference: str | None = "base"  # whose golden values it must match; None: its own
    first_iteration_of: str | None = None  # iteration 1 only against this row's golden values
    needs: frozenset[str] = frozenset()  # "gpu", "te", "blackwell": without them the launcher must refuse the row
    saves: bool = False  # keeps its final checkpoint for rows that load it
    loads_from: str | None = None  # PRETRAIN_CHECKPOINT_PATH = that row's checkpoint folder
    nodes: int = 1  # > 1: ENV=dlc, one launcher per node (gpus per node = gpus / nodes)

    @property
    def sft(self) -> bool:
        return self.args.get("SFT") == "true"

    @property
    def golden_name(self) -> str:
        """The row whose golden values this one is checked against at every iteration."""
        return self.reference or self.name

    @property
    def first_replayed(self) -> int | None:
        """The first iteration replayed from a CUDA graph, for a row that trains under one."""
        return CUDA_GRAPH_FIRST_REPLAYED if self.env.get("MP_CUDA_GRAPH") == "true" else None


def _table(path: Path = ROWS_FILE) -> dict:
    return _parsed(Path(path), Path(path).stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _parsed(path: Path, mtime_ns: int) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def settings_table(path: Path = ROWS_FILE) -> dict[str, Settings]:
    return {name: Settings(name, **values) for name, values in _table(path)["settings"].items()}


def tolerances(path: Path = ROWS_FILE) -> dict[str, Tolerance]:
    return {name: Tolerance(**values) for name, values in _table(path)["tolerances"].items()}


def tolerance(precision: str, reference_precision: str, on_gpu: bool, path: Path = ROWS_FILE) -> Tolerance:
    """The coarser precision's; fp32 runs may differ only in summation order (less so on the CPU's gloo)."""
    coarser = max(precision, reference_precision, key=PRECISION_ORDER.index)
    return tolerances(path)[coarser if coarser != "fp32" or on_gpu else "fp32-cpu"]


def matrix_rows(settings: Settings, path: Path = ROWS_FILE) -> list[Row]:
    """The rows for these settings: every launcher argument value and knob, each against the simplest layout of its
    data; a row whose PR is the base's own precision is the base and is left out."""
    known = {f.name for f in fields(Row)}
    values = {"precision": settings.precision, "vp": max(1, get_size(settings.model_size).num_layers // 4)}
    rows = []
    for entry in _table(path)["rows"]:
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{path}: row {entry.get('name')} has unknown field(s) {', '.join(sorted(unknown))}; "
                             f"a row takes {', '.join(sorted(known))}")
        filled = {key: {k: str(v).format(**values) for k, v in entry.get(key, {}).items()} for key in ("args", "env")}
        entry = {**entry, **filled, "what": str(entry["what"]).format(**values),
                 "needs": frozenset(entry.get("needs", ()))}
        if entry["args"].get("PR") != settings.precision:
            rows.append(Row(**entry))
    return rows


def gpus_needed(row: Row, rows: dict[str, Row]) -> int:
    """GPUs for the row and the row whose checkpoint it loads (run first in the same call)."""
    return max([row.gpus] + ([gpus_needed(rows[row.loads_from], rows)] if row.loads_from else []))


def golden_rows(rows: list[Row]) -> set[str]:
    """The rows with golden values: every reference, and each row that is its own."""
    return {row.golden_name for row in rows} | {row.first_iteration_of for row in rows if row.first_iteration_of}


# ---- golden values ----

_golden_lock = threading.Lock()


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, dict[str, dict]]:
    """{variant: {row: {precision, device, date, losses: {iteration: value}, grad_norms: {...}}}}"""
    return json.loads(path.read_text()) if path.is_file() else {}


def keep_golden(path: Path, variant: str, row: str, result: dict, replace: bool = False) -> bool:
    """Writes a reference row's curves as its golden values (only where it has none, unless `replace`: the one way
    a golden value changes is a deliberate --bless). Returns whether it wrote."""
    with _golden_lock:
        golden = load_golden(path)
        if row in golden.get(variant, {}) and not replace:
            return False
        golden.setdefault(variant, {})[row] = {key: result.get(key) for key in (
            "precision", "device", "date", "skipped", "losses", "grad_norms")}
        golden = {v: dict(sorted(entries.items())) for v, entries in sorted(golden.items())}
        path.write_text(_golden_text(golden), encoding="utf-8")
        return True


def _golden_text(golden: dict) -> str:
    """One line per row and variant: a diff shows which reference moved."""
    lines = ["{"]
    for i, (variant, entries) in enumerate(golden.items()):
        lines.append(f" {json.dumps(variant)}: {{")
        for j, (row, entry) in enumerate(entries.items()):
            comma = "," if j < len(entries) - 1 else ""
            lines.append(f"  {json.dumps(row)}: {json.dumps(entry, ensure_ascii=False)}{comma}")
        lines.append(" }" + ("," if i < len(golden) - 1 else ""))
    return "\n".join(lines + ["}"]) + "\n"


# ---- the check ----

@dataclass
class Deviation:
    """The largest differences over the compared iterations: loss (absolute) and grad norm (relative)."""

    iterations: list[int]
    loss: float = 0.0
    loss_at: int | None = None
    grad_norm: float | None = None  # None: no grad norm on one side
    grad_norm_at: int | None = None


def deviation(result: dict, expected: dict, iterations: list[int] | None = None) -> Deviation:
    """Signed differences at the iterations both curves have (or those given), the largest of each kept."""
    losses, want = result.get("losses") or {}, expected.get("losses") or {}
    shared = sorted(set(losses) & set(want), key=int) if iterations is None else [str(i) for i in iterations]
    found = Deviation([int(it) for it in shared])
    for it in shared:
        difference = losses[it] - want[it]
        if abs(difference) >= abs(found.loss):
            found.loss, found.loss_at = difference, int(it)
    norms, want_norms = result.get("grad_norms") or {}, expected.get("grad_norms") or {}
    for it in (it for it in shared if it in norms and it in want_norms):
        relative = (norms[it] - want_norms[it]) / abs(want_norms[it]) if want_norms[it] else norms[it]
        if found.grad_norm is None or abs(relative) >= abs(found.grad_norm):
            found.grad_norm, found.grad_norm_at = relative, int(it)
    return found


def check_row(row: Row, result: dict, golden: dict[str, dict], on_gpu: bool,
              path: Path = ROWS_FILE) -> tuple[Deviation | None, list[str]]:
    """(the largest deviation from the golden values, problems) for a row that trained: every iteration against
    its golden row's (and at least one replayed from a CUDA graph where the row trains under one), iteration 1
    against first_iteration_of's; more than half the iterations skipped by the loss scaler; a loss that did not
    fall. No golden values: no deviation (the first run of a reference writes them)."""
    losses = [result["losses"][k] for k in sorted(result["losses"], key=int)]
    problems = []
    # fp16's dynamic loss scale may halve on its first steps (skipping them); most skipped is a failure.
    if result.get("skipped") and 2 * result["skipped"] >= len(losses):
        problems.append(f"{result['skipped']} of the iterations skipped by the loss scaler (last scale "
                        f"{result.get('loss_scale')})")
    if not losses[-1] < losses[0]:
        problems.append(f"loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if row.first_iteration_of and row.first_iteration_of in golden:
        first = golden[row.first_iteration_of]
        if "1" in first["losses"] and "1" in result["losses"]:
            tol = tolerance(result["precision"], first["precision"], on_gpu, path)
            difference = result["losses"]["1"] - first["losses"]["1"]
            if abs(difference) > tol.loss:
                problems.append(f"iteration-1 loss {difference:+.2e} from {row.first_iteration_of}'s, beyond "
                                f"{tol.loss:g}")
    expected = golden.get(row.golden_name)
    if expected is None:
        return None, problems
    found = deviation(result, expected)
    return found, problems + _beyond(row, found, result, expected, tolerance(result["precision"],
                                                                              expected["precision"], on_gpu, path))


def _beyond(row: Row, found: Deviation, result: dict, expected: dict, tol: Tolerance) -> list[str]:
    problems = []
    missing = sorted(set(expected["losses"]) - set(result["losses"]), key=int)
    if missing:
        problems.append(f"no loss at iteration(s) {', '.join(missing)}, which the golden values have")
    if abs(found.loss) > tol.loss:
        problems.append(f"loss at iteration {found.loss_at} {found.loss:+.2e} from the golden values, beyond "
                        f"{tol.loss:g}")
    if found.grad_norm is not None and abs(found.grad_norm) > tol.grad_norm:
        problems.append(f"grad norm at iteration {found.grad_norm_at} {100 * found.grad_norm:+.2f}% from the "
                        f"golden values, beyond {100 * tol.grad_norm:g}%")
    if row.first_replayed and not any(it >= row.first_replayed for it in found.iterations):
        problems.append(f"no iteration from {row.first_replayed} on (replayed from the CUDA graph) was compared")
    return problems
