"""The hypothesis profiles scale every property test's example count (tests/_hypothesis)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile,expected", [("default", 40), ("ci", 40), ("thorough", 400)])
def test_a_profile_scales_the_examples(profile, expected):
    code = "from tests._hypothesis import examples; print(examples(40))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "HYPOTHESIS_PROFILE": profile})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == expected
