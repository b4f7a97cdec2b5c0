"""Runs the GPU matrix's rows on this machine (python -m benchmarks.gpu_matrix; tests/integration/test_gpu_matrix.py
and test_dlc.py on the CPU): each row's launcher command from the table, one launcher per node, its result read
back (status, every iteration's loss and grad norm, tokens/s, peak memory) and kept in the state file, and one
scheduler that runs up to `jobs` rows at once on the least-busy GPUs within a time budget."""

from __future__ import annotations

import datetime
import fnmatch
import importlib.metadata
import json
import os
import shutil
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from megatron_patch import hardware
from megatron_patch.atomic_write import atomic_write_text
from megatron_patch.harness import launcher_runs
from megatron_patch.harness.iteration_log import last_iteration_mark, megatron_iterations, run_curves, \
    steady_throughput
from megatron_patch.harness.launcher_runs import Launched, clean_environ, launcher_argv, start_launcher, \
    wait_launchers
from megatron_patch.harness.matrix_assets import Assets, converted_checkpoint
from megatron_patch.harness.matrix_table import GOLDEN_FILE, ROWS_FILE, Row, Settings, check_row, golden_rows, \
    gpus_needed, keep_golden, load_golden, matrix_rows

REPO = Path(__file__).resolve().parents[2]
STATE = REPO / "docs" / "gpu_matrix.json"


def variant_of_machine() -> str:
    if hardware.gpu_count() == 0:
        return "cpu"
    return "te" if hardware.transformer_engine_importable() else "local"


def te_version() -> str:
    for name in ("transformer_engine", "transformer-engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def device_description() -> str:
    gpus = hardware.gpu_count()
    if gpus == 0:
        return f"CPU ({os.cpu_count()} cores)"
    import torch

    return f"{gpus}x {torch.cuda.get_device_name(0)}"


def missing_for(row: Row, has_gpu: bool, has_te: bool, gpu_capability: int = 0) -> list[str]:
    """What this machine lacks for the row: the launcher must refuse the row when this is not empty."""
    missing = []
    if "blackwell" in row.needs and gpu_capability < 100:
        missing.append("a Blackwell GPU")
    if "gpu" in row.needs and not has_gpu:
        missing.append("a GPU")
    if "te" in row.needs and not has_te:
        missing.append("Transformer Engine")
    return missing


def load_state(path: Path) -> dict:
    state = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("rows", "settings", "checkpoint"):
        state.setdefault(key, {})
    state.setdefault("calls", [])
    return state


def save_state(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=1, ensure_ascii=False) + "\n")


class Matrix:
    """Runs rows on this machine and keeps their results in the state file."""

    def __init__(self, settings: Settings, assets: Assets, work: Path, state_path: Path = STATE,
                 checkpoint: Path | None = None, variant: str | None = None, golden_path: Path = GOLDEN_FILE,
                 rows_path: Path = ROWS_FILE):
        self.settings = settings
        self.rows_path = rows_path
        self.rows = {row.name: row for row in matrix_rows(settings, rows_path)}
        self.assets = assets
        self.work = Path(work)
        self.state_path = Path(state_path)
        self.state = load_state(self.state_path)
        self.golden_path = Path(golden_path)
        self.variant = variant or variant_of_machine()
        self.has_gpu = self.variant != "cpu"
        self._checkpoint = checkpoint
        self.checkpoint_how = "given" if checkpoint else ""
        self.saved_checkpoints: dict[str, Path] = {}  # row name -> its saved checkpoint folder on this machine
        self.failed: list[str] = []  # rows of this process whose check failed
        self.state_lock = threading.Lock()

    # -- inputs --

    def checkpoint(self) -> Path:
        if self._checkpoint is None:
            self._checkpoint, self.checkpoint_how = converted_checkpoint(
                self.work, self.settings.model_size, self.settings.precision, self.assets)
        return self._checkpoint

    def out_dir(self, row: Row) -> Path:
        return self.work / "runs" / self.variant / row.name

    def launcher_args(self, row: Row, checkpoint: str | None = None) -> list[str]:
        s = self.settings
        data = dict(DATASET_PATH=self.assets.pretrain_prefix)
        if row.sft and row.env.get("MP_DATASET_TYPE") == "raw":
            data = dict(DATASET_PATH=self.assets.sft_json, VALID_DATASET_PATH=self.assets.sft_valid_json)
        elif row.sft:
            data = dict(DATASET_PATH=self.assets.sft_prefix(s.seq_len),
                        VALID_DATASET_PATH=self.assets.sft_prefix(s.seq_len, "valid"))
        values = dict(ENV="dlc" if row.nodes > 1 else "dsw", MODEL_SIZE=s.model_size, BATCH_SIZE=s.micro_batch,
                      GLOBAL_BATCH_SIZE=s.global_batch, LR=s.lr, MIN_LR=s.lr / 10, SEQ_LEN=s.seq_len,
                      PR=s.precision, SAVE_INTERVAL=s.iterations if row.saves else 100000,
                      PRETRAIN_CHECKPOINT_PATH=checkpoint or self.checkpoint(), OUTPUT_BASEPATH=self.out_dir(row),
                      **data)
        return launcher_argv(iterations=s.iterations, **{**values, **row.args})

    def launcher_env(self, row: Row, extra: dict[str, str] | None = None,
                     gpus: list[int] | None = None) -> dict[str, str]:
        knobs = {"MP_TOKENIZER_PATH": str(self.assets.tokenizer), **row.env}
        if row.nodes == 1:
            knobs["MP_NPROC_PER_NODE"] = str(row.gpus)
            if gpus is not None and self.has_gpu:
                knobs["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return clean_environ(**knobs, **(extra or {}))

    def command_text(self, args: list[str], env: dict[str, str]) -> str:
        names = {str(self.assets.root): "$ASSETS", str(self.work): "$WORK"}
        if self._checkpoint is not None:
            names[str(self._checkpoint)] = "$CHECKPOINT"
        return launcher_runs.command_text(args, env, names)

    # -- one row --

    def run_row(self, row: Row, gpus: list[int] | None = None) -> dict:
        """Trains the row once on this machine (on `gpus`, default all); returns its result, kept in the state."""
        out = self.out_dir(row)
        shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint there would be resumed
        if row.loads_from and row.loads_from not in self.saved_checkpoints:
            self.run_row(self.rows[row.loads_from])
        loads = self.saved_checkpoints.get(row.loads_from) if row.loads_from else None
        if row.loads_from and loads is None:
            return self.record(row, dict(status="failed", message=f"{row.loads_from} saved no checkpoint",
                                         command="", seconds=0))
        args = self.launcher_args(row, str(loads) if loads else None)
        last_line = None
        if self.settings.stop_after_last_iteration and not row.saves:
            last_line = last_iteration_mark(self.settings.iterations)
        if row.nodes > 1:
            launched, command = self.run_nodes(row, args, last_line, gpus)
        else:
            env = self.launcher_env(row, gpus=gpus)
            command = self.command_text(args, env)
            print(f"gpu_matrix: {self.variant}/{row.name}: {command}", flush=True)
            proc = start_launcher(args, env, out / "launcher.log")
            (launched,) = wait_launchers([proc], [out / "launcher.log"], last_line, self.settings.row_timeout_s)
        result = dict(self.read_result(launched, out), command=command)
        if row.saves and result["status"] == "ok":
            # checkpoint/ also holds the launcher's per-node lock files
            (folder,) = [p for p in (out / "checkpoint").iterdir()
                         if (p / "latest_checkpointed_iteration.txt").is_file()]
            self.saved_checkpoints[row.name] = folder
        return self.record(row, result)

    def run_nodes(self, row: Row, args: list[str], last_line: str | None,
                  gpus: list[int] | None = None) -> tuple[Launched, str]:
        """ENV=dlc: one launcher per node with the scheduler's variables, as a DLC job sets them."""
        port = str(hardware.free_port())
        per_node = row.gpus // row.nodes
        gpus = gpus or list(range(row.gpus))
        procs, logs, commands = [], [], []
        for node in range(row.nodes):
            extra = {"WORLD_SIZE": str(row.nodes), "RANK": str(node), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": port, "KUBERNETES_CONTAINER_RESOURCE_GPU": str(per_node)}
            if self.has_gpu:
                extra["CUDA_VISIBLE_DEVICES"] = ",".join(str(gpus[node * per_node + g]) for g in range(per_node))
            env = self.launcher_env(row, extra)
            commands.append(self.command_text(args, env))
            logs.append(self.out_dir(row) / f"node{node}" / "launcher.log")
            procs.append(start_launcher(args, env, logs[-1]))
        print(f"gpu_matrix: {self.variant}/{row.name}: " + " & ".join(commands), flush=True)
        launched = wait_launchers(procs, logs, last_line, self.settings.row_timeout_s)
        # The last rank (on the last node) logs the losses; a failure anywhere fails the row.
        failed = next((node for node in launched if node.returncode != 0 and not node.stopped), None)
        merged = failed or launched[-1]
        if failed is not None and failed is not launched[-1]:
            merged = Launched(failed.returncode, failed.output + launched[-1].output, failed.seconds)
        return merged, " & ".join(commands)

    def read_result(self, launched: Launched, out: Path) -> dict:
        iterations = self.settings.iterations
        result = dict(seconds=round(launched.seconds, 1))
        refused = launcher_runs.refusal_message(launched)
        if refused:
            return dict(result, status="refused", message=refused)
        error = launcher_runs.last_error_line(launched.output)
        if launched.timed_out:
            return dict(result, status="failed", message=f"timed out after {self.settings.row_timeout_s} s: {error}")
        if launched.returncode != 0 and not launched.stopped:
            return dict(result, status="failed", message=error)
        losses, grad_norms = run_curves(out / "tensorboard", launched.output, iterations)
        logged = megatron_iterations(launched.output)
        if sorted(logged) != list(range(1, iterations + 1)) or len(losses) < 2:
            return dict(result, status="failed", message=f"iterations logged {sorted(logged)} with losses at "
                                                         f"{sorted(losses)}, expected 1..{iterations}: {error}")
        rate, peak = steady_throughput(launched.output)
        scales = [v["loss scale"] for v in logged.values() if v["loss scale"] is not None]
        return dict(result, status="ok", losses={str(k): v for k, v in sorted(losses.items())},
                    grad_norms={str(k): v for k, v in sorted(grad_norms.items())},
                    skipped=sum(v["skipped"] for v in logged.values()), loss_scale=scales[-1] if scales else None,
                    tokens_per_s_per_gpu=round(rate), peak_gib=round(peak, 2) if peak else None)

    def record(self, row: Row, result: dict) -> dict:
        """Keeps the result in the state (and, for a reference row without golden values, as its golden values)
        and prints it with its check."""
        result.update(row=row.name, variant=self.variant, device=device_description(),
                      te=te_version() if self.variant == "te" else "none",
                      date=datetime.date.today().isoformat(), precision=row.args.get("PR", self.settings.precision))
        with self.state_lock:  # rows end in several threads under --jobs
            self.state["rows"][f"{self.variant}/{row.name}"] = result
            self.state["settings"][self.variant] = asdict(self.settings)
            if self.checkpoint_how:
                self.state["checkpoint"][self.variant] = self.checkpoint_how
            save_state(self.state, self.state_path)
        line = f"gpu_matrix: {self.variant}/{row.name}: {result['status']}"
        if result.get("message"):
            line += f" ({result['message']})"
        if result["status"] == "ok":
            if row.name in golden_rows(list(self.rows.values())) and keep_golden(
                    self.golden_path, self.variant, row.name, result):
                line += "; its golden values written (it had none)"
            deviation, problems = self.check(row, result)
            if deviation is not None:
                line += f"; largest loss deviation {deviation.loss:+.2e} (iteration {deviation.loss_at})"
            if problems:
                self.failed.append(row.name)
                line += "; CHECK FAILED: " + "; ".join(problems)
        print(line, flush=True)
        return result

    def check(self, row: Row, result: dict):
        return check_row(row, result, load_golden(self.golden_path).get(self.variant, {}), self.has_gpu,
                         self.rows_path)

    def result(self, name: str) -> dict | None:
        return self.state["rows"].get(f"{self.variant}/{name}")

    # -- which rows, and the scheduler --

    def select(self, patterns: str | None) -> list[Row]:
        if not patterns:
            return list(self.rows.values())
        wanted = [p.strip() for p in patterns.split(",") if p.strip()]
        unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(r, p) for r in self.rows)]
        if unknown:
            raise SystemExit(f"error: --rows {', '.join(unknown)} matches no row; rows: {', '.join(self.rows)}")
        return [row for row in self.rows.values() if any(fnmatch.fnmatchcase(row.name, p) for p in wanted)]

    def processes_available(self) -> int:
        return hardware.gpu_count() or 2

    def plan(self, rows: list[Row], redo: bool) -> list[Row]:
        """The rows to run in order: those this machine can hold and the state lacks (all of them with redo),
        each after the row whose checkpoint it loads and after its reference where the golden values lack it."""
        golden = load_golden(self.golden_path).get(self.variant, {})
        todo: list[Row] = []
        for row in rows:
            if gpus_needed(row, self.rows) > self.processes_available():
                print(f"gpu_matrix: {row.name}: planned, needs {gpus_needed(row, self.rows)} GPUs", flush=True)
                continue
            if self.result(row.name) and not redo:
                continue
            first = [self.rows[row.loads_from]] if row.loads_from else []
            if row.golden_name not in golden and self.result(row.golden_name) is None:
                first.append(self.rows[row.golden_name])
            for needed in first + [row]:
                if needed not in todo:
                    todo.append(needed)
        return todo

    def run(self, rows: list[Row], budget_s: float, redo: bool = False, jobs: int = 1,
            after_each=lambda: None) -> None:
        """Up to `jobs` rows at once, each on the least-busy GPUs it needs (a GPU takes ceil(jobs / GPUs) rows at a
        time): launch, checkpoint load and compilation are host work, and a 0.5B row uses a fraction of an H200.
        A row that loads another's checkpoint starts once that row has saved, one whose reference has no golden
        values once the reference has run; no row starts that would end after
        budget_s (its estimate: the longest row so far). Each result records how many other rows shared its GPUs
        (its tokens/s is then a smoke figure of a shared GPU). after_each: called as each row ends."""
        start = time.time()
        todo = self.plan(rows, redo)
        golden = load_golden(self.golden_path).get(self.variant, {})
        if todo:
            self.checkpoint()  # converted once, before the threads that read it
        gpu_total = self.processes_available()
        per_gpu = -(-jobs // gpu_total)
        load = {gpu: 0 for gpu in range(gpu_total)}
        running: dict[threading.Thread, tuple[Row, list[int]]] = {}
        ended: set[str] = set()
        spent: list[float] = []
        while todo or running:
            for thread in [t for t in running if not t.is_alive()]:
                row, gpus = running.pop(thread)
                ended.add(row.name)
                for gpu in gpus:
                    load[gpu] -= 1
            for row in list(todo):
                if row.loads_from and row.loads_from not in self.saved_checkpoints:
                    if row.loads_from in ended:  # it ran and saved nothing
                        todo.remove(row)
                        self.record(row, dict(status="failed", message=f"{row.loads_from} saved no checkpoint",
                                              command="", seconds=0))
                    continue
                pending = {r.name for r in todo} | {r.name for r, _ in running.values()}
                if row.golden_name != row.name and row.golden_name not in golden and row.golden_name in pending:
                    continue  # its reference writes the golden values it is checked against
                if len(running) >= jobs:
                    break
                if time.time() - start + (max(spent) if spent else 60) > budget_s:
                    print(f"gpu_matrix: budget of {budget_s:.0f} s reached before {row.name}", flush=True)
                    todo.clear()
                    break
                gpus = sorted(load, key=lambda g: (load[g], g))[:row.gpus]
                if any(load[g] >= per_gpu for g in gpus):
                    continue
                sharing = len([1 for _, used in running.values() if set(used) & set(gpus)])
                for gpu in gpus:
                    load[gpu] += 1
                todo.remove(row)
                thread = threading.Thread(target=self._work, args=(row, gpus, sharing, spent, after_each),
                                          name=row.name, daemon=True)
                running[thread] = (row, gpus)
                thread.start()
            time.sleep(0.2)

    def _work(self, row: Row, gpus: list[int], sharing: int, spent: list[float], after_each) -> None:
        row_start = time.time()
        try:
            result = self.run_row(row, gpus)
            result["rows_sharing_its_gpus"] = sharing
        except Exception as error:  # a bug here must not cost the call's other rows
            traceback.print_exc()
            self.record(row, dict(status="failed", message=f"gpu_matrix: {type(error).__name__}: {error}",
                                  command="", seconds=round(time.time() - row_start, 1)))
        with self.state_lock:
            spent.append(time.time() - row_start)
            save_state(self.state, self.state_path)
        after_each()
