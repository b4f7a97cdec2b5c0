"""Kept for convert/mcore_runtime.py until it calls megatron_patch.patches.apply(args): the manifest's entries that
need no arguments (its upstream fixes, checkpoint hardening and log line). The patches themselves, with why and
until when, are in megatron_patch/patches."""

from __future__ import annotations


def apply() -> None:
    from megatron_patch import patches

    for kind in (patches.FIX, patches.RELIABILITY, patches.LOGGING):
        patches.install_kind(kind)
