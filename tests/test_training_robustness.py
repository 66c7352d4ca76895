"""What a cluster run meets: broken and half-written checkpoints, full disks, divergence, resumed logs,
time-based checkpoints, stop signals (in-process here; under torchrun in test_preemption.py)."""
import errno
import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from phases import extract, sample, train
from runtime.atomic_file import DiskFullError
from runtime.checkpoint import BrokenCheckpointError, list_checkpoints, load_checkpoint
from runtime.config import ConfigError, load_config
from runtime.console import MetricsLog, wandb_run_id
from runtime.preemption import Preempted
from runtime.training_loop import NonFiniteLossError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"


def cfg_for(digits_cache, exp, *extra):
    return load_config(CONFIG, [f"data.cache_path={digits_cache}", f"experiment_dir={exp}", "train.batch_size=8",
                                "train.progress=false", "train.log_every=2", "train.ckpt_every=2", "train.keep_last=0", *extra])


def steps_of(exp):
    return [step for step, _ in list_checkpoints(Path(exp) / "checkpoints")]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint"])
def test_a_broken_latest_checkpoint_is_moved_aside_and_the_previous_one_resumes(digits_cache, tmp_path, capsys, damage):
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=4"))
    latest = tmp_path / "checkpoints" / "0000004.pt"
    content = latest.read_bytes()
    latest.write_bytes({"truncated": content[: len(content) // 2], "empty": b"", "not a checkpoint": b"hello"}[damage])
    damaged = latest.read_bytes()
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=6"))
    out = capsys.readouterr().out
    assert f"moved it to {latest}.broken" in out and "resumed from step 2" in out
    assert (tmp_path / "checkpoints" / "0000004.pt.broken").read_bytes() == damaged  # kept, never deleted
    assert steps_of(tmp_path) == [2, 4, 6] and load_checkpoint(latest)["step"] == 4  # step 4 trained again


def test_ckpt_pointing_at_a_broken_file_is_a_one_line_error(digits_cache, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"\x80\x02junk")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, why in (("bad.pt", "cannot read checkpoint"), ("empty.pt", "the file is empty (0 bytes)")):
        with pytest.raises(BrokenCheckpointError, match=re.escape(why)) as info:
            sample.run(cfg_for(digits_cache, tmp_path, f"ckpt={tmp_path / name}"))
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_half_written_checkpoints_of_a_killed_run_are_removed(digits_cache, tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir(parents=True)
    stale = folder / ".0000002.pt.tmp-999999"
    stale.write_bytes(b"half")
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=2"))
    assert not stale.exists() and steps_of(tmp_path) == [2]


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(digits_cache, tmp_path, monkeypatch):
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=2"))
    before = (tmp_path / "checkpoints" / "0000002.pt").read_bytes()

    def full(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=4"))
    message = str(info.value)
    assert "no space left on device while writing" in message and "0000004.pt" in message
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / '0000002.pt'} is intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000002.pt"]  # no temporary left
    assert (tmp_path / "checkpoints" / "0000002.pt").read_bytes() == before


def test_non_finite_weights_are_never_saved(digits_cache, tmp_path, monkeypatch):
    """The loss of step 3 is finite (computed before the update); the update makes a weight inf."""
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=2"))
    real = torch.optim.AdamW.step

    def diverging_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights \(NaN or inf\) at step 3: nothing was saved; "
                                                 r"the last good checkpoint is .*0000002.pt"):
        train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=4", "train.ckpt_every=1", "train.log_every=100"))
    assert steps_of(tmp_path) == [2]


def test_a_resumed_run_keeps_one_history(digits_cache, tmp_path):
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=4", "train.ckpt_every=4"))
    log = tmp_path / "logs" / "train.jsonl"
    with open(log, "a") as handle:  # what a run killed after step 6, before its next checkpoint, leaves
        handle.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 8, "lo')
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=8", "train.ckpt_every=4"))
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert json.loads(log.read_text().splitlines()[2])["loss"] != 1.0
    assert (tmp_path / "logs" / "wandb_train.id").is_file() is False  # wandb is off: no id made


def test_time_based_checkpoints_keep_only_the_newest(digits_cache, tmp_path):
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=7", "train.ckpt_every=4", "train.ckpt_every_minutes=1e-9"))
    assert steps_of(tmp_path) == [4, 7]  # 1, 2, 3, 5, 6 were written and superseded


def test_a_stop_signal_saves_the_step_and_the_rerun_continues_exactly(digits_cache, tmp_path, monkeypatch):
    full = load_checkpoint(train.run(cfg_for(digits_cache, tmp_path / "full", "train.max_steps=6", "train.ckpt_every=100")))
    real = torch.optim.AdamW.step
    calls = []

    def step_then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # as Slurm sends before a preemption
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    with pytest.raises(Preempted, match=r"stopped at step 3 on SIGUSR1; checkpoint .*0000003.pt; re-run") as info:
        train.run(cfg_for(digits_cache, tmp_path / "stopped", "train.max_steps=6", "train.ckpt_every=100"))
    assert info.value.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    resumed = load_checkpoint(train.run(cfg_for(digits_cache, tmp_path / "stopped", "train.max_steps=6", "train.ckpt_every=100")))
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert steps_of(tmp_path / "stopped") == [6]  # the stop checkpoint is superseded


def test_guidance_without_a_null_class_is_a_config_error(digits_cache, tmp_path):
    # the training grids guide at sample.cfg_scale too: refused before training starts
    with pytest.raises(ConfigError, match=r"cfg_scale=2.0 asks for classifier-free guidance.*no null class"):
        train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=2", "model.class_dropout_prob=0", "train.sample_every=1"))
    assert not (tmp_path / "checkpoints").exists()
    train.run(cfg_for(digits_cache, tmp_path, "train.max_steps=2", "model.class_dropout_prob=0", "train.sample_every=0"))
    common = ["model.class_dropout_prob=0", "sample.steps=2", "sample.classes=[1]", "sample.per_class=1"]
    with pytest.raises(ConfigError, match=r"cfg_scale=2.0 asks for classifier-free guidance.*no null class"):
        sample.run(cfg_for(digits_cache, tmp_path, *common, "sample.cfg_scale=2.0"))
    assert sample.run(cfg_for(digits_cache, tmp_path, *common, "sample.cfg_scale=1.0")).is_file()


def test_a_cache_with_more_classes_than_the_model_is_an_error(digits_cache, tmp_path):
    with pytest.raises(ValueError, match=r"has 10 classes \(labels up to 9\) but model.num_classes=5"):
        train.run(cfg_for(digits_cache, tmp_path, "model.num_classes=5"))
    assert not (tmp_path / "checkpoints").exists()


def test_wandb_continues_one_run_per_folder_and_phase(tmp_path):
    first = wandb_run_id(tmp_path, "train")
    assert wandb_run_id(tmp_path, "train") == first != wandb_run_id(tmp_path, "distill")
    assert (tmp_path / "wandb_train.id").read_text().strip() == first


def test_wandb_offline_resumes_the_same_run(digits_cache, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ids = []
    for max_steps in (2, 4):
        cfg = cfg_for(digits_cache, tmp_path, f"train.max_steps={max_steps}", "wandb.mode=offline")
        log = MetricsLog(cfg, "train")
        ids.append(log.wandb_run.id)
        log.close()
    assert ids[0] == ids[1] == (tmp_path / "logs" / "wandb_train.id").read_text().strip()


def test_fine_tuning_to_another_size_and_class_count(digits_cache, tmp_path):
    """model.init_mode=resize: a 16-px, 10-class demo checkpoint trains on 32-px digits with 12 classes."""
    source = train.run(cfg_for(digits_cache, tmp_path / "small", "train.max_steps=2"))
    big_cache = tmp_path / "digits32.h5"
    extract.run(load_config(CONFIG, [f"data.cache_path={big_cache}", "data.image_size=32"]))
    common = [f"model.init_from={source}", "data.image_size=32", "model.num_classes=12", "train.max_steps=1",
              "train.lr=1e-12", "train.warmup_steps=0"]
    with pytest.raises(ValueError, match="does not fit"):
        train.run(cfg_for(big_cache, tmp_path / "strict", *common))
    tuned = load_checkpoint(train.run(cfg_for(big_cache, tmp_path / "tuned", *common, "model.init_mode=resize")))
    before = load_checkpoint(source)["ema"]
    assert tuned["model_args"]["input_size"] == 32 and tuned["model"]["y_embedder.embedding_table.weight"].shape[0] == 13
    assert torch.allclose(tuned["model"]["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"], atol=1e-6)
    assert tuned["model"]["pos_embed"].shape[1] == 64
