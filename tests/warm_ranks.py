"""Training ranks forked from one warm process: the test harness's way to start the entrypoint's ranks.

Each rank of a tiny CPU run spends most of its life importing what every rank imports (torch, megatron-core's
training loop, transformers for the tokenizer, torch._dynamo for the first optimizer): about 8 s of a CPU core on
a 2-core CI machine. This process imports them once per test session and forks a rank per request; the fork
then runs megatron_patch.pretrain_qwen's entry as `python -m megatron_patch.pretrain_qwen ARGS` does, in its own
process session, environment, working folder and output files. The launcher's tests start their ranks through
torchrun, as users do.

Protocol (one JSON object per line): the harness writes {"id", "argv", "env", "cwd", "stdout", "stderr"}; this
process answers {"id", "pid"} once the rank is forked and {"exit": pid, "code": returncode} (negative: the
signal) once it has ended. It stops when the harness closes its input.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import sys
import time


def warm_imports() -> None:
    # The entrypoint first, as in a fresh rank: it imports megatron-core under its own conditions (on a CPU,
    # Megatron's fusions stay eager), which an earlier import of any megatron module would bypass.
    from megatron_patch import pretrain_qwen  # noqa: F401  (torch, megatron-core and megatron.training)

    import torch._dynamo  # noqa: F401  (torch.optim's first optimizer imports it)
    from megatron.core.tokenizers.text.libraries import huggingface_tokenizer  # noqa: F401
    from transformers import AutoTokenizer  # noqa: F401  (transformers' lazy import table, read once)


def become_rank(request: dict) -> None:
    """In the forked child: the rank's session, folder, environment and output, then the entrypoint. Never
    returns."""
    code = 1
    try:
        os.setsid()  # its own process group, as the harness started ranks before (start_new_session)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        from megatron_patch import pretrain_qwen

        for name, value in pretrain_qwen.ENVIRONMENT_DEFAULTS.items():  # what its import set in a fresh process
            os.environ.setdefault(name, value)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        from megatron.training import training

        training.set_startup_timestamps(program_start=time.time())  # the rank's start, not this process's
        sys.argv = [pretrain_qwen.__file__, *request["argv"]]
        pretrain_qwen.run_exiting_on_error(pretrain_qwen.main, request["argv"])  # ends the process itself
        code = 0
    except SystemExit as exit_:  # Megatron's own exits (argparse's too): as the interpreter ends on them
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
        code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 1
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001  (whatever it was, the rank's stderr says so)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    warm_imports()
    replies = os.dup(1)  # answers go to the harness's pipe; nothing else writes there
    os.dup2(2, 1)
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:
                return  # the harness is gone or done
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os.close(replies)
                    become_rank(request)
                os.write(replies, json.dumps({"id": request["id"], "pid": pid}).encode() + b"\n")
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            os.write(replies, json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


if __name__ == "__main__":
    serve()
