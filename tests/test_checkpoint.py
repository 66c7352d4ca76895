"""Checkpoints: atomic writes, latest by step number, keep-last-k, weights_only loading."""
import os
import time
from pathlib import Path

import pytest
import torch

from runtime.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def test_latest_is_by_step_not_by_time_or_size(tmp_path):
    save_checkpoint({"w": torch.zeros(1000)}, tmp_path, 200)
    save_checkpoint({"w": torch.zeros(1)}, tmp_path, 1000)
    save_checkpoint({"w": torch.zeros(10)}, tmp_path, 30)  # newest file, smallest step
    old = time.time() - 1000
    os.utime(checkpoint_path(tmp_path, 1000), (old, old))
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1000)


def test_keep_last_and_no_temporary_files(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [30, 40]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000030.pt", "0000040.pt"]


def test_failed_save_leaves_previous_latest_intact(tmp_path):
    save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint({"bad": Unpicklable()}, tmp_path, 2)
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["0000001.pt"]


def test_weights_only_roundtrip_and_errors(tmp_path):
    state = {"model": {"a": torch.arange(4.0)}, "step": 5, "config": {"x": [1, 2]}}
    path = save_checkpoint(state, tmp_path, 5)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["a"], state["model"]["a"]) and loaded["config"] == {"x": [1, 2]}
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(None, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        resolve_checkpoint(str(tmp_path / "missing.pt"), tmp_path)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        load_checkpoint(broken)


def test_files_and_folders_that_are_not_checkpoints_say_what_they_are(tmp_path):
    from runtime.checkpoint import BrokenCheckpointError

    text = tmp_path / "notes.pt"
    text.write_text("101 steps of notes\n")
    with pytest.raises(BrokenCheckpointError, match="not a torch checkpoint \\(a text file starting '101 steps of notes'\\)"):
        load_checkpoint(text)
    binary = tmp_path / "image.pt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    with pytest.raises(BrokenCheckpointError, match="not a torch checkpoint \\(it starts with the bytes 89 50 4e 47"):
        load_checkpoint(binary)
    save_checkpoint({"step": 5}, tmp_path / "run", 5)
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoints"):  # a run folder, or its checkpoints/
        with pytest.raises(FileNotFoundError, match=f"is a directory, not a checkpoint file .* holds 1 checkpoint\\(s\\) "
                                                    f"\\(0000005.pt\\): pass one, e.g. ckpt=.*0000005.pt"):
            resolve_checkpoint(str(given), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory, .*; it holds no checkpoints"):
        resolve_checkpoint(str(tmp_path / "empty"), tmp_path)


def test_an_experiment_dir_below_a_file_is_named_before_any_work(tmp_path, capsys):
    import main

    blocker = tmp_path / "results"
    blocker.write_text("a file")
    config = str(Path(__file__).resolve().parents[1] / "configs/demo/digits.yaml")
    assert main.main(["-c", config, "-p", "sample", f"experiment_dir={blocker / 'run'}"]) == 1
    err = capsys.readouterr().err
    assert f"experiment_dir={blocker / 'run'} cannot be created: {blocker} is a file, not a folder" in err
    assert main.main(["-c", config, "-p", "sample", f"experiment_dir={blocker}"]) == 1
    assert f"experiment_dir={blocker} is a file, not a folder" in capsys.readouterr().err
