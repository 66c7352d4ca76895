"""What a resumable job must not change between runs, kept in `<folder>/run.json`.

The first run writes the settings that define its output; every later run in the same folder must
present the same ones, so work made with other settings is never mixed into it.
"""
from __future__ import annotations

import json
from pathlib import Path

from runtime.atomic_file import write_text_atomic

FILE = "run.json"


def check_run_identity(folder: str | Path, identity: dict, holds: str, remedy: str) -> None:
    """Raise ValueError naming the changed keys if `folder` was started with another identity.

    `holds` says what the folder contains ("images", "a distillation"), `remedy` what to do.
    """
    path = Path(folder) / FILE
    identity = json.loads(json.dumps(identity))  # as it reads back: tuples become lists
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != identity:
            changed = [f"{k}: {previous.get(k)!r} then, {identity.get(k)!r} now"
                       for k in sorted(set(previous) | set(identity)) if previous.get(k) != identity.get(k)]
            raise ValueError(f"{folder} holds {holds} made with other settings ({'; '.join(changed)}): {remedy}")
    else:
        write_text_atomic(path, json.dumps(identity, indent=1))
