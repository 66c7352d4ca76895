"""scripts/plot_run.py draws one or several runs on shared axes; scripts/timesteps.py --plot marks tau and the pivot."""
import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import plot_run  # noqa: E402
import timesteps  # noqa: E402

from runtime.config import load_config  # noqa: E402


def fake_run(folder: Path, scale: float, with_fid: bool) -> Path:
    (folder / "logs").mkdir(parents=True)
    lines = []
    for step in (10, 20, 30):
        record = {"step": step, "loss": scale / step, "img/s": 500.0 + step}
        record.update({f"mse_t{lo:03d}-{lo + 99:03d}": scale * (1 - lo / 1000) for lo in range(0, 1000, 100)})
        lines.append(json.dumps(record))
        lines.append(json.dumps({"step": step, "val_loss": scale / step + 0.1}))
    (folder / "logs" / "train.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 40, "lo')  # a torn last line
    if with_fid:
        (folder / "eval").mkdir()
        (folder / "eval" / "fid_vs_step.json").write_text(json.dumps({"points": [{"step": 20, "fid": 30.0},
                                                                                 {"step": 10, "fid": 40.0}]}))
    return folder


def test_plot_run_draws_every_panel_for_several_runs(tmp_path):
    runs = [fake_run(tmp_path / "uniform", 1.0, True), fake_run(tmp_path / "speed", 0.8, False)]
    records = plot_run.read_records(runs[0])
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30]
    centres, values = plot_run.bucket_profile(records)
    assert len(centres) == 10 and centres[0] == 49.5 and values[0] == 1.0
    assert plot_run.fid_points(runs[0]) == ([10, 20], [40.0, 30.0]) and plot_run.fid_points(runs[1]) == ([], [])
    assert plot_run.main([str(r) for r in runs] + ["-o", str(tmp_path / "out.png")]) == 0
    with Image.open(tmp_path / "out.png") as image:
        assert image.size[0] > 1000 and image.size[1] > 600
    assert plot_run.main([str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")]) == 1


def test_timesteps_plot_marks_tau_the_pivot_and_names_the_parameters(tmp_path):
    cfg = load_config(ROOT / "configs/imagenet_256/dit_xl2_speed.yaml")
    assert timesteps.markers(cfg) == {"tau": 700, "dual pivot": 642}
    assert "tau=700" in timesteps.title_of(cfg) and "k=5.0" in timesteps.title_of(cfg) and "lam=0.6" in timesteps.title_of(cfg)
    uniform = load_config(ROOT / "configs/imagenet_256/dit_xl2.yaml")
    assert timesteps.markers(uniform) == {} and timesteps.title_of(uniform) == "sampler=uniform, weighting=none"
    assert timesteps.main(["-c", str(ROOT / "configs/imagenet_256/dit_xl2_speed.yaml"), "--plot", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").is_file()
