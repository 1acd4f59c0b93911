"""The examples a user would copy run and print what they claim."""

import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def test_demo_runs():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--limit", "200000"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "primes below 200000: 17984" in out
