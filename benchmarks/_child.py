"""Run one benchmark configuration in a fresh process (so peak-memory figures are its
own) and read back the JSON line it prints."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(script: str, cfg: dict) -> dict:
    """``python script --child '<cfg json>'``; returns the dict of its last output line."""
    out = subprocess.run([sys.executable, script, "--child", json.dumps(cfg)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
