"""train.parallel=fsdp|hsdp end to end on the digits demo under torchrun (2 CPU processes, gloo): sharded training
equals DDP training, a SIGKILLed sharded run resumes exactly, its checkpoint folders continue on another number of
processes, and sampling, inference and distillation read them as they read single files."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from launch import env
from phases import inference, sample
from runtime.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint, sharded_path
from runtime.config import load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"
STEPS = 20
TRAIN = ["train.batch_size=16", "train.grad_accum=2", "train.ckpt_every=10", "train.log_every=10", "train.progress=false", "train.keep_last=0",
         "train.warmup_steps=0", "train.sample_every=10", "train.sample_steps=3", "sample.classes=[1,7]",
         "sample.per_class=2", "sample.batch_size=4"]


def torchrun(exp: Path, *args, nproc: int = 2, config: Path = CONFIG, phase: str = "train") -> subprocess.CompletedProcess:
    command = launch.torchrun(config, "-p", phase, f"experiment_dir={exp}", *args)
    command[command.index("--nproc_per_node=2")] = f"--nproc_per_node={nproc}"
    return subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def final(exp: Path, step: int = STEPS) -> dict:
    return load_checkpoint(dict(list_checkpoints(checkpoint_dir(exp)))[step])


def assert_close(a: dict, b: dict, keys=("model", "ema")) -> None:
    """Equal to float32 round-off: DDP all-reduces and FSDP reduce-scatters, in other orders. (The attention key
    biases have zero gradient in exact arithmetic; AdamW turns their round-off into steps of up to lr * g / eps,
    a few 1e-5 after 20 steps: the tolerance.)"""
    for key in keys:
        assert set(a[key]) == set(b[key])
        for name, tensor in a[key].items():
            torch.testing.assert_close(tensor, b[key][name], rtol=1e-4, atol=5e-5, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def runs(digits_cache, tmp_path_factory):
    """FSDP: one uninterrupted run and one SIGKILLed after its first checkpoint and re-run; DDP: the same config."""
    root = tmp_path_factory.mktemp("fsdp")
    common = [f"data.cache_path={digits_cache}", *TRAIN, f"train.max_steps={STEPS}"]
    full, resumed, _ = launch.killed_and_resumed_training(CONFIG, [*common, "train.parallel=fsdp"], root / "fsdp", STEPS)
    succeeded(torchrun(root / "ddp", *common))
    return {"root": root, "common": common, "full": full, "resumed": resumed, "exp": root / "fsdp" / "full"}


def test_sharded_training_equals_ddp_training(runs):
    ddp = final(runs["root"] / "ddp")
    assert_close(runs["full"], ddp)
    for a, b in zip(runs["full"]["optimizers"]["model"]["state"].values(), ddp["optimizers"]["model"]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert runs["full"]["step"] == ddp["step"] == STEPS


def test_a_killed_sharded_run_resumes_exactly(runs):
    launch.assert_same_weights(runs["full"], runs["resumed"])
    folder = sharded_path(runs["exp"], STEPS)
    assert folder.is_dir() and {p.name for p in folder.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                      "meta.pt"}
    grids = sorted(p.name for p in (runs["exp"] / "samples" / "train").glob("*.png"))
    assert grids == ["0000010.png", "0000020.png"]  # sampled by both ranks, written by rank 0


def test_a_two_process_checkpoint_continues_in_one_process(runs, tmp_path):
    """Sharded in 1 process (DCP reshards) and DDP in a plain process (consolidated) continue alike."""
    outputs = {}
    for name in ("fsdp1", "plain"):
        shutil.copytree(sharded_path(runs["exp"], 10), sharded_path(tmp_path / name, 10))
    outputs["fsdp1"] = succeeded(torchrun(tmp_path / "fsdp1", *runs["common"], "train.parallel=fsdp", nproc=1)).stdout
    outputs["plain"] = launch.main_py(CONFIG, "-p", "train", f"experiment_dir={tmp_path / 'plain'}",
                                      *runs["common"]).stdout
    for name, stdout in outputs.items():
        assert "resumed from step 10" in stdout, name
    assert sharded_path(tmp_path / "fsdp1", STEPS).is_dir() and (checkpoint_dir(tmp_path / "plain") / "0000020.pt").is_file()
    assert_close(final(tmp_path / "fsdp1"), final(tmp_path / "plain"))


def test_sampling_and_inference_read_a_folder_as_its_consolidated_file(runs, tmp_path):
    folder = sharded_path(runs["exp"], STEPS)
    single = tmp_path / "consolidated.pt"
    proc = subprocess.run([sys.executable, "scripts/consolidate_checkpoint.py", str(folder), "-o", str(single)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"wrote {single} (step {STEPS}" in proc.stdout, proc.stderr
    state = torch.load(single, map_location="cpu", weights_only=True)
    assert state["model_args"] == runs["full"]["model_args"] and "optimizers" in state
    outputs = {}
    for name, ckpt in (("folder", folder), ("file", single)):
        overrides = [f"experiment_dir={runs['exp']}", *runs["common"], f"ckpt={ckpt}", "sample.steps=5",
                     f"sample.output={tmp_path / name}", "inference.num_samples=6", "inference.batch_size=4",
                     f"inference.output={tmp_path / name / 'samples.npz'}"]
        grid = sample.run(load_config(CONFIG, overrides))
        npz = inference.run(load_config(CONFIG, overrides))
        with np.load(npz) as arrays:
            outputs[name] = (grid.read_bytes(), arrays["arr_0"].copy(), arrays["arr_1"].copy())
    assert outputs["folder"][0] == outputs["file"][0]
    assert np.array_equal(outputs["folder"][1], outputs["file"][1]) and outputs["folder"][1].std() > 0
    assert np.array_equal(outputs["folder"][2], outputs["file"][2])


def test_hsdp_equals_ddp_and_a_folder_teaches_a_sharded_distillation(runs, tmp_path):
    """HSDP (two replicas of one-process shards) to the first checkpoint; then progressive distillation of the
    sharded teacher folder with a sharded student equals the same distillation under DDP."""
    succeeded(torchrun(tmp_path / "hsdp", *runs["common"], "train.max_steps=10", "train.parallel=hsdp",
                       "train.shard_size=1"))
    assert_close(final(tmp_path / "hsdp", 10), final(runs["root"] / "ddp", 10))
    distill = ["distill.start_steps=4", "distill.end_steps=2", "distill.iters_per_stage=4", "distill.first_stage_iters=null",
               "distill.batch_size=16", "distill.ckpt_every=2", "distill.log_every=2", "distill.eval_samples=4",
               "distill.progress=false", f"distill.teacher={sharded_path(runs['exp'], STEPS)}", *runs["common"][:1],
               *TRAIN[-3:]]
    students = {}
    for parallel in ("fsdp", "ddp"):
        exp = tmp_path / f"distill_{parallel}"
        succeeded(torchrun(exp, *distill, f"train.parallel={parallel}", config=ROOT / "configs/demo/digits_distill.yaml",
                           phase="distill"))
        students[parallel] = final(exp / "distill" / "0002_steps", 4)
    assert sharded_path(tmp_path / "distill_fsdp" / "distill" / "0002_steps", 4).is_dir()
    assert_close(students["fsdp"], students["ddp"], keys=("model",))


def test_flow_in_bf16_with_activation_checkpointing_trains_sharded(digits_cache, tmp_path):
    """FSDP's mixed precision (bf16 compute, fp32 reduction and master weights), recomputed LightningDiT blocks."""
    proc = succeeded(torchrun(tmp_path, f"data.cache_path={digits_cache}", *TRAIN, "train.max_steps=4", "train.ckpt_every=2",
                              "train.log_every=2", "train.sample_every=0", "train.precision=bf16",
                              "model.grad_checkpointing=true", "train.parallel=fsdp", "model.name=LightningDiT-T/4",
                              config=ROOT / "configs/demo/digits_flow.yaml"))
    assert "step 4 | loss" in proc.stdout
    state = final(tmp_path, 4)
    assert state["method"] == "flow" and all(t.dtype == torch.float32 for t in state["model"].values())
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_sharded_runs_refuse_what_they_cannot_do(runs, digits_cache, tmp_path):
    plain = subprocess.run([sys.executable, "main.py", "-c", str(CONFIG), "-p", "train", f"experiment_dir={tmp_path / 'a'}",
                            f"data.cache_path={digits_cache}", "train.parallel=fsdp"], cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2 and "launch with torchrun" in plain.stderr, plain.stderr
    assert not (tmp_path / "a" / "checkpoints").exists()
    ddp_file = checkpoint_dir(runs["root"] / "ddp") / "0000010.pt"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(ddp_file, tmp_path / "b" / "checkpoints")
    proc = torchrun(tmp_path / "b", *runs["common"], "train.parallel=fsdp", nproc=1)
    assert proc.returncode != 0 and "is a single-file checkpoint (a train.parallel=ddp run)" in proc.stdout + proc.stderr
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["0000010.pt"]  # nothing lost
