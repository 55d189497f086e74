"""Checkpoint files that are never silently wrong: written atomically, with a checksum.

A checkpoint is a ``torch.save`` file holding ``{"format": FORMAT, "sha256": ...,
"payload": bytes}``, the payload being the ``torch.save`` bytes of the run's state.  On
load a truncated, empty, corrupted (any flipped byte) or foreign file is refused with an
:class:`~trajopt.errors.InvalidArgumentError` that names the file and what is wrong,
instead of a raw unpickling traceback or, worse, a resume from corrupted optimizer state.
Everything is read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from trajopt.errors import InvalidArgumentError

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint"]

FORMAT = "nnbridge-checkpoint/1"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (a temporary file, then a rename): an
    interrupted save leaves the previous checkpoint intact."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(),
                "payload": payload}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint`, after checking format and checksum."""
    path = Path(path)
    what = f"checkpoint {path}"
    if path.is_dir():
        raise InvalidArgumentError(f"{what} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise InvalidArgumentError(f"{what} is empty (an interrupted copy?); delete it to "
                                   "start the run afresh")
    try:
        outer = torch.load(path, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, foreign pickled objects
        raise InvalidArgumentError(f"{what} cannot be read ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:120]}); it is truncated, "
                                   "corrupted or not a checkpoint of nnbridge.train") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise InvalidArgumentError(f"{what} is not a checkpoint of nnbridge.train (format "
                                   f"{FORMAT!r} expected)")
    payload = outer.get("payload")
    if not isinstance(payload, bytes) or \
            hashlib.sha256(payload).hexdigest() != outer.get("sha256"):
        raise InvalidArgumentError(f"{what} is corrupted: its checksum does not match; "
                                   "delete it to start the run afresh")
    return torch.load(io.BytesIO(payload), weights_only=True)
