"""How every process of ours brings Megatron up: the training entrypoint, the convertor and the tests call
`start_megatron` (and import Megatron's modules inside `importing_megatron`), so a fix to start-up lands
everywhere at once.

    with importing_megatron():              # patches.prepare: the process's and (no GPU) the CPU backend's entries
        from megatron.training import ...
    args = start_megatron(argv)             # the machine's flags in front, --model-size expanded, megatron-core's
                                            # parser plus ours, then patches.apply
"""

from __future__ import annotations

import contextlib
import sys

from megatron_patch import hardware, patches
from megatron_patch.megatron_flags import add_extra_args, expand_model_size, machine_flags


@contextlib.contextmanager
def importing_megatron():
    """Import Megatron's modules inside this: the manifest's entries that must precede them are in place (on a
    machine without a GPU, the CPU backend), and those that hold only during the import end with it."""
    patches.prepare(patches.device_here())
    try:
        yield
    finally:
        patches.end_import_time_entries()


def start_megatron(argv: list[str]):
    """Megatron's parsed and validated arguments for this command line, with this run's patches applied. The
    machine's flags (CPU: gloo and the local spec; a GPU without Transformer Engine: no Apex kernels) go in front,
    so flags given in `argv` still win. sys.argv becomes the command line Megatron parsed (it reads it again)."""
    device = patches.device_here()
    with importing_megatron():
        from megatron.training.arguments import parse_and_validate_args
    has_te = device != "cpu" and hardware.transformer_engine_importable()
    sys.argv = [sys.argv[0], *machine_flags(device, has_te), *expand_model_size(argv)]
    args = parse_and_validate_args(extra_args_provider=add_extra_args)
    patches.apply(args, device)
    return args
