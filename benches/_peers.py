"""Shared by the benchmark scripts: which runners can run here."""

from __future__ import annotations


def available(own: list, peers: list[tuple[type, str]]) -> list:
    """``own`` runners, then each peer runner whose module imports (a peer
    that is not installed is skipped, and said so)."""
    out = list(own)
    for cls, mod in peers:
        try:
            __import__(mod)
            out.append(cls)
        except ImportError:
            print(f"({cls.name} not installed: skipped)")
    return out
