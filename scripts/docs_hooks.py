"""MkDocs hook: the configuration page's CLI reference is generated from
the installed `shoal` command's own help, so it cannot drift from it."""

from __future__ import annotations

import re
import subprocess

MARK = "<!-- cli-reference -->"


def _help(*args: str) -> str:
    return subprocess.run(
        ["shoal", *args, "--help"], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def _commands(text: str) -> list[str]:
    """The subcommands a clap help text lists (under "Commands:")."""
    block = text.split("Commands:", 1)[1].split("\n\n", 1)[0] if "Commands:" in text else ""
    names = [m.group(1) for m in re.finditer(r"^  (\S+)", block, re.M)]
    return [n for n in names if n != "help"]


def _reference() -> str:
    out, top = [], _help()
    out.append(f"```text\n$ shoal --help\n{top}\n```")
    for cmd in _commands(top):
        text = _help(cmd)
        out.append(f"### `shoal {cmd}`\n\n```text\n{text}\n```")
        for sub in _commands(text):
            out.append(f"#### `shoal {cmd} {sub}`\n\n```text\n{_help(cmd, sub)}\n```")
    return "\n\n".join(out)


def on_page_markdown(markdown: str, page, **kwargs) -> str:  # noqa: ARG001 (mkdocs' signature)
    if MARK in markdown:
        markdown = markdown.replace(MARK, _reference())
    return markdown
