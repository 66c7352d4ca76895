"""Sharded checkpoint folders (train.parallel=fsdp|hsdp) in one process: the folder format, finding, pruning and
consolidating them, and the parallelism strategy's guard rails. (Training with them under torchrun:
tests/test_fsdp_end_to_end.py.)"""
import pytest
import torch
from torch import nn

from runtime import parallel, sharded_checkpoint
from runtime.atomic_file import remove_stale_temporaries
from runtime.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_latest_loadable,
    prune,
    resolve_checkpoint,
    save_checkpoint,
    sharded_path,
)
from runtime.config import ConfigError


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(5, 3)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _write(run_dir, step: int, model=None, optimizer=None) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, optimizer = (model, optimizer) if model is not None else _trained()
    tensors = {"model": model.state_dict(), "ema": model.state_dict(),
               "optimizers": {"model": get_optimizer_state_dict(nn.ModuleDict({"model": model}), optimizer)}}
    sharded_checkpoint.save(sharded_path(run_dir, step), tensors, {"step": step, "rng": {"torch": torch.get_rng_state()}})


def test_a_folder_consolidates_to_what_a_single_file_holds(tmp_path):
    model, optimizer = _trained()
    _write(tmp_path, 7, model, optimizer)
    folder = sharded_path(tmp_path, 7)
    assert sharded_checkpoint.is_sharded(folder)
    state = load_checkpoint(folder)
    assert set(state) == {"model", "ema", "optimizers", "step", "rng"}  # the list of parts is not part of it
    assert state["step"] == 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(state["model"][name], tensor)
    # The optimizer state is keyed by position, as torch's optimizers keep it: a plain optimizer loads it.
    fresh = torch.optim.AdamW(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).parameters(), lr=1e-2)
    fresh.load_state_dict(state["optimizers"]["model"])
    expected = optimizer.state_dict()
    assert fresh.state_dict()["param_groups"] == expected["param_groups"]
    for index, moments in expected["state"].items():
        for key, value in moments.items():
            assert torch.equal(state["optimizers"]["model"]["state"][index][key], value), (index, key)


def test_indexed_follows_the_param_groups_order():
    state = {"state": {"b.w": {"step": 1}, "a.w": {"step": 2}},
             "param_groups": [{"lr": 0.1, "params": ["b.w"]}, {"lr": 0.2, "params": ["a.w", "c.w"]}]}
    out = sharded_checkpoint.indexed(state)
    assert out["param_groups"] == [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1, 2]}]
    assert out["state"] == {0: {"step": 1}, 1: {"step": 2}}


def test_folders_and_files_are_listed_pruned_and_resolved_alike(tmp_path):
    save_checkpoint({"step": 10}, tmp_path, 10)
    _write(tmp_path, 20)
    _write(tmp_path, 30)
    unfinished = sharded_path(tmp_path, 40)
    unfinished.mkdir()  # a folder without meta.pt is never a checkpoint
    folder = checkpoint_dir(tmp_path)
    assert [step for step, _ in list_checkpoints(folder)] == [10, 20, 30]
    assert latest_checkpoint(tmp_path) == sharded_path(tmp_path, 30)
    assert resolve_checkpoint(None, tmp_path) == sharded_path(tmp_path, 30)
    assert resolve_checkpoint(str(sharded_path(tmp_path, 20)), tmp_path) == sharded_path(tmp_path, 20)
    with pytest.raises(FileNotFoundError, match="nor a finished sharded checkpoint folder"):
        resolve_checkpoint(str(unfinished), tmp_path)
    prune(folder, keep_last=1)
    assert [step for step, _ in list_checkpoints(folder)] == [30]
    assert not sharded_path(tmp_path, 20).exists() and unfinished.exists()


def test_a_half_written_folder_is_removed_and_a_broken_one_moved_aside(tmp_path):
    _write(tmp_path, 10)
    _write(tmp_path, 20)
    folder = checkpoint_dir(tmp_path)
    stale = folder / ".0000030.tmp-123"  # a run killed while writing step 30
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"partial")
    assert stale in remove_stale_temporaries(folder) and not stale.exists()
    (sharded_path(tmp_path, 20) / sharded_checkpoint.META).write_bytes(b"")  # a broken meta.pt
    path, meta = load_latest_loadable(tmp_path)
    assert path == sharded_path(tmp_path, 10) and meta["step"] == 10
    assert (folder / "0000020.broken").is_dir()


def test_a_broken_folder_names_itself(tmp_path):
    _write(tmp_path, 10)
    folder = sharded_path(tmp_path, 10)
    (folder / "__0_0.distcp").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read sharded checkpoint .*0000010"):
        load_checkpoint(folder)


def test_the_strategy_guard_rails(monkeypatch):
    assert parallel.check("ddp", 0, "fp16", 2) == ()  # DDP takes everything it took before
    with pytest.raises(ConfigError, match="launch with torchrun"):
        parallel.check("fsdp", 0, "fp32", 1)
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(parallel.dist, "world_size", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert parallel.check("fsdp", 0, "bf16", 1) == (8,)
    assert parallel.check("hsdp", 0, "bf16", 1) == (2, 4)  # sharded inside a node, replicated across nodes
    assert parallel.check("hsdp", 2, "fp32", 1) == (4, 2)
    with pytest.raises(ConfigError, match="shard_size=3"):
        parallel.check("hsdp", 3, "fp32", 1)
    with pytest.raises(ConfigError, match="fp16"):
        parallel.check("fsdp", 0, "fp16", 1)
    with pytest.raises(ConfigError, match="several networks"):
        parallel.check("fsdp", 0, "fp32", 2)
    with pytest.raises(ConfigError, match="forward-mode"):  # MeanFlow's JVP
        parallel.check("hsdp", 0, "fp32", 1, functional=True)
