"""`python -m megatron_patch.patches`: the manifest as a table, one row per entry (what it changes, when it is
installed, when it can go)."""

from __future__ import annotations

import textwrap

from megatron_patch.patches import MANIFEST, PINNED_MEGATRON_CORE


def manifest_table() -> str:
    rows = [f"Changes to torch, the standard library and megatron-core {PINNED_MEGATRON_CORE} "
            f"({len(MANIFEST)} entries; megatron_patch/patches/__init__.py says why each is needed)", ""]
    for patch in MANIFEST:
        rows.append(f"{patch.name}  [{patch.kind}{', while importing Megatron' if patch.remove else ''}]")
        for target in patch.changes:
            rows += textwrap.wrap(target, 116, initial_indent="  changes: ", subsequent_indent="           ")
        rows += textwrap.wrap(patch.until, 116, initial_indent="  until:   ", subsequent_indent="           ")
    return "\n".join(rows)


if __name__ == "__main__":
    print(manifest_table())
