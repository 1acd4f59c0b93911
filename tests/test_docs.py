"""The documentation site: it builds with `mkdocs build --strict`, its API
reference covers every public name, and every code block in docs/ runs.

How a page's blocks run (in order, in one session per page, in a fresh
directory that is also $HOME, with this Python's `bin` first on PATH):

* ``python``: in one Python process per page, sharing its globals, as a
  reader pasting them into one interpreter would;
* ``sh``/``bash``: with ``bash -euo pipefail`` (`pip install shoal` finds
  the wheel in dist/); what a block starts in the
  background (``&``) runs on until the page's end, then is stopped;
* ``toml``: a settings file: Shoal must accept it (SHOAL_CONFIG);
* ``text`` (or no language): output or a drawing, not code.

A block that cannot run here is preceded by ``<!-- test: skip REASON -->``;
the reason is required and the skipped blocks are listed in the summary.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

import shoal

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
BLOCK_TIMEOUT = 240
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,})(?P<info>[^`]*)$")
SKIP = re.compile(r"<!--\s*test:\s*skip\s*(?P<reason>.*?)\s*-->")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"


def blocks(page: str) -> list[Block]:
    lines = (DOCS / page).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        lang = (m["info"].split() or [""])[0]
        # A skip marker on the nearest non-blank line above.
        above = next((s for s in reversed(lines[:i]) if s.strip()), "")
        skip = SKIP.search(above)
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        body = textwrap.dedent("\n".join(x[indent:] for x in lines[i + 1 : j]))
        out.append(Block(page, i + 1, lang, body, skip["reason"] if skip else None))
        i = j + 1
    return out


# One Python per page: runs each block it is sent in shared globals and
# answers on fd 3 (the blocks' own output goes to the page's log).
RUNNER = r"""
import json as _json, os as _os, sys as _sys, traceback as _traceback
_answers = _os.fdopen(int(_sys.argv[1]), "w")
# The blocks run in the real __main__, so that what they define can be
# pickled by reference (multiprocessing's own pools need that).
for _line in _sys.stdin:
    _block = _json.loads(_line)
    try:
        exec(compile(_block["code"], _block["where"], "exec"), globals())
        _answers.write(_json.dumps({"ok": True}) + "\n")
    except BaseException:
        _answers.write(_json.dumps({"ok": False, "error": _traceback.format_exc()}) + "\n")
    _answers.flush()
"""


class Session:
    """A page's directory, environment, Python and background programs."""

    def __init__(self, tmp: Path):
        self.dir = tmp
        self.log = open(tmp / "page.log", "w+b")  # noqa: SIM115 (closed in close())
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SHOAL_", "XDG_CONFIG")) and k not in ("PYTHONPATH",)
        }
        self.env |= {
            "HOME": str(tmp),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1",
            # `pip install shoal` finds the wheel scripts/build-wheels.sh made,
            # as it would find it on a package index once published.
            "PIP_FIND_LINKS": " ".join([str(ROOT / "dist"), os.environ.get("PIP_FIND_LINKS", "")]),
            # Open MPI here: more ranks than this machine's 2 cores, and (in
            # CI) as root, which the HPC page says how to allow.
            "OMPI_MCA_rmaps_base_oversubscribe": "1",
        }
        if os.geteuid() == 0:
            self.env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        self.python: subprocess.Popen | None = None
        self.groups: list[int] = []

    def run(self, b: Block) -> None:
        if b.lang == "python":
            self.run_python(b)
        elif b.lang in ("sh", "bash"):
            self.run_sh(b)
        elif b.lang == "toml":
            self.check_toml(b)
        else:
            raise AssertionError(f"{b.where}: no rule to run a {b.lang!r} block")

    def run_python(self, b: Block) -> None:
        if self.python is None:
            r, w = os.pipe()
            self.python = subprocess.Popen(
                [sys.executable, "-c", RUNNER, str(w)],
                stdin=subprocess.PIPE,
                stdout=self.log,
                stderr=self.log,
                cwd=self.dir,
                env=self.env,
                pass_fds=(w,),
                text=True,
            )
            os.close(w)
            self.answers = os.fdopen(r)
        assert self.python.stdin is not None
        self.python.stdin.write(json.dumps({"code": b.code, "where": b.where}) + "\n")
        self.python.stdin.flush()
        answer = self.answers.readline()  # the pytest timeout bounds this wait
        assert answer, f"{b.where}: Python exited\n{self.tail()}"
        result = json.loads(answer)
        assert result["ok"], f"{b.where} raised:\n{result['error']}\n{self.tail()}"

    def run_sh(self, b: Block) -> None:
        p = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", b.code],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            cwd=self.dir,
            env=self.env,
            start_new_session=True,  # its background programs stay in its group
        )
        self.groups.append(p.pid)
        try:
            rc = p.wait(BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{b.where} ran past {BLOCK_TIMEOUT} s\n{self.tail()}") from None
        assert rc == 0, f"{b.where} exited with {rc}\n{self.tail()}"

    def check_toml(self, b: Block) -> None:
        tomllib.loads(b.code)
        path = self.dir / f"settings-{b.line}.toml"
        path.write_text(b.code)
        # (`shoal info` shows a bad file instead of refusing it.)
        out = subprocess.run(
            [sys.executable, "-c", "from shoal import _core; _core.check_settings()"],
            env={**self.env, "SHOAL_CONFIG": str(path)},
            capture_output=True,
        )
        assert out.returncode == 0, f"{b.where}: Shoal refused it: {out.stderr.decode()}"

    def tail(self) -> str:
        self.log.flush()
        return "--- the page's output, last lines:\n" + (
            (self.dir / "page.log").read_bytes()[-4000:].decode(errors="replace")
        )

    def close(self) -> None:
        if self.python is not None:
            assert self.python.stdin is not None
            self.python.stdin.close()
            try:
                self.python.wait(60)
            except subprocess.TimeoutExpired:
                self.python.kill()
                self.python.wait()
            self.answers.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for g in self.groups:
                try:
                    os.killpg(g, sig)
                except ProcessLookupError:
                    pass
            if sig == signal.SIGTERM:
                time.sleep(1)
        self.log.close()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_runs(page, tmp_path):
    todo = [b for b in blocks(page) if b.lang not in ("", "text")]
    session = Session(tmp_path)
    try:
        for b in todo:
            if b.skip is not None:
                assert b.skip, f"{b.where}: a skipped block must say why"
                continue
            if "pip install shoal" in b.code:
                assert list((ROOT / "dist").glob("shoal-*.whl")), (
                    f"{b.where} installs the wheel: run scripts/build-wheels.sh first"
                )
            session.run(b)
    finally:
        session.close()


def test_skipped_blocks_are_few_and_say_why():
    skipped = [b for p in PAGES for b in blocks(p) if b.skip is not None]
    ran = [b for p in PAGES for b in blocks(p) if b.skip is None and b.lang not in ("", "text")]
    print(f"\n{len(ran)} code blocks run, {len(skipped)} skipped:")
    for b in skipped:
        print(f"  {b.where} ({b.lang}): {b.skip}")
    assert all(b.skip for b in skipped)
    assert len(skipped) <= len(ran) // 10, "more than one block in ten is not run"


def test_api_reference_covers_every_public_name():
    text = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: shoal\.(\w+)", text, re.M))
    public = set(shoal.__all__) - {"__version__"}
    assert public <= documented, f"not in docs/api.md: {sorted(public - documented)}"


@pytest.mark.timeout(600)
def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-6000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in set(shoal.__all__) - {"__version__"}:
        assert f'id="shoal.{name}"' in api, f"the API page has no entry for {name}"
    config = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "shoal submit" in config and "--scheduler-file" in config  # the generated CLI help
