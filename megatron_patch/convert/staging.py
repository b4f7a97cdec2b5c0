"""Where the convertor may write: SAVE_DIR never holds, nor lies inside, a checkpoint it reads.

The output itself is written beside SAVE_DIR and put in place whole (megatron_patch.atomic_write.StagedFolder,
fault points convert:*), so a kill at any moment leaves SAVE_DIR holding a complete checkpoint (the old one or the
new one); on a file system that cannot exchange two names, the next convertor run finishes an interrupted
--overwrite first (`recover_interrupted`).
"""

from __future__ import annotations

from pathlib import Path

from megatron_patch.errors import UserError


def check_save_dir(save_dir: Path, overwrite: bool, inputs: dict[str, Path]) -> None:
    """SAVE_DIR may neither hold an input nor lie inside one (after resolving symlinks): --overwrite would delete
    the input, and a conversion must never write into the checkpoint it reads."""
    save_dir = save_dir.resolve()
    for what, src in inputs.items():
        src = src.resolve()
        if save_dir == src or src.is_relative_to(save_dir) or save_dir.is_relative_to(src):
            relation = ("is" if save_dir == src else "contains" if src.is_relative_to(save_dir) else "lies inside")
            raise UserError(f"error: SAVE_DIR {save_dir} {relation} {what} {src}, so converting could overwrite or "
                            f"delete its input; choose a SAVE_DIR that is neither inside {what} nor holds it, e.g. "
                            f"a sibling folder {src.parent / (src.name + '-converted')}.")
    if save_dir.exists() and (not save_dir.is_dir() or any(save_dir.iterdir())) and not overwrite:
        raise UserError(f"error: SAVE_DIR {save_dir} already exists and is not empty; remove it, choose another "
                        "folder, or pass --overwrite.")
