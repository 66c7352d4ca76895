"""The extract phase end to end on a generated image folder and a tiny random VAE:
skipped files, flip encodings, 2 processes == 1 process, interrupted runs, guard rails."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from test_datasets_autoencoder import make_tiny_vae  # pytest puts tests/ on sys.path
from test_datasets_image_folder import CORRUPT, make_image_folder

from datasets.autoencoder import load_autoencoder
from datasets.digits import digits_images
from datasets.image_folder import ImageFolderSource
from datasets.latent_cache import parts_folder, read_cache_info
from phases import extract
from runtime.config import load_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as in each torchrun process (OMP_NUM_THREADS=1): CPU convolutions can round
    differently with another thread count, and these tests compare caches bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The image folder, the VAE folder, a config file, and a reference 1-process cache."""
    root = tmp_path_factory.mktemp("extract")
    images = make_image_folder(root / "images")
    make_tiny_vae(root / "vae")
    config = root / "extract.yaml"
    config.write_text(textwrap.dedent(f"""\
        data:
          source: folder
          image_root: {images}
          image_size: {SIZE}
          cache_path: {root / 'reference.h5'}
        autoencoder:
          name: {root / 'vae'}
        extract:
          batch_size: 4
          flush_every: 2
          num_workers: 0
          precision: bf16
        """))
    extract.run(load_config(config))
    return {"root": root, "images": images, "vae": root / "vae", "config": config, "reference": root / "reference.h5"}


def cfg_for(setup, *overrides):
    return load_config(setup["config"], list(overrides))


def read_all(path):
    with h5py.File(path) as handle:
        return {name: handle[name][()] for name in handle}


def assert_same_cache(path, reference):
    a, b = read_all(path), read_all(reference)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_extraction_lists_everything_and_skips_unreadable_files(setup):
    info = read_cache_info(setup["reference"])
    assert info["num_listed"] == 23 and info["num_items"] == 21 and info["num_skipped"] == 2
    assert info["latent_shape"] == (4, SIZE // 2, SIZE // 2) and info["image_size"] == SIZE
    assert info["scale_factor"] == pytest.approx(0.18215) and info["precision"] == "fp32"  # bf16 only on CUDA
    assert info["class_names"] == ["ant", "bee", "cat"] and info["source"] == "folder"
    data = read_all(setup["reference"])
    source = ImageFolderSource(setup["images"], SIZE)
    kept = [i for i, p in enumerate(source.paths) if p not in CORRUPT]
    assert [p.decode() for p in data["paths"]] == [source.paths[i] for i in kept]
    np.testing.assert_array_equal(data["labels"], source.labels[kept])
    assert [p.decode() for p in data["skipped_paths"]] == CORRUPT
    assert "UnidentifiedImageError" in data["skipped_reasons"][0].decode()
    assert data["moments"].dtype == np.float16 and data["moments"].shape == (21, 2, 2, 4, 8, 8)
    assert (data["moments"][:, :, 1] > 0).all()  # std
    assert not parts_folder(setup["reference"]).exists()  # parts removed once assembled


def test_flip_slot_holds_the_encoding_of_the_flipped_image(setup):
    ae = load_autoencoder(str(setup["vae"]), "cpu")
    source = ImageFolderSource(setup["images"], SIZE)
    data = read_all(setup["reference"])
    paths = [p.decode() for p in data["paths"]]
    for name in ("ant/a_rgb.jpg", "ant/f_rgba.png", "cat/n3.png"):
        _, image, _ = source[source.paths.index(name)]
        pixels = image[None].float() / 127.5 - 1
        stored = torch.from_numpy(data["moments"][paths.index(name)]).float()
        for flip, x in ((0, pixels), (1, pixels.flip(-1))):
            mean, std = ae.encode(x)
            torch.testing.assert_close(stored[flip, 0], mean[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(stored[flip, 1], std[0], atol=2e-3, rtol=2e-3)
        # the VAE is not flip-equivariant: flipping the latent would have been wrong
        assert (stored[1, 0] - stored[0, 0].flip(-1)).abs().max() > 0.01


def test_grey_images_go_through_an_rgb_vae_as_three_equal_channels(setup):
    ae = load_autoencoder(str(setup["vae"]), "cpu")
    grey = torch.rand(2, 1, SIZE, SIZE) * 2 - 1
    torch.testing.assert_close(
        extract.encode_both_flips(ae, grey), extract.encode_both_flips(ae, grey.expand(-1, 3, -1, -1))
    )


def test_finished_cache_is_detected(setup, capsys):
    before = setup["reference"].stat().st_mtime_ns
    extract.run(cfg_for(setup))
    assert "already complete (21 items)" in capsys.readouterr().out
    assert setup["reference"].stat().st_mtime_ns == before


def test_two_processes_give_the_same_cache(setup, tmp_path):
    script = tmp_path / "run_extract.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from runtime.config import load_config
        from phases import extract
        extract.run(load_config(sys.argv[1], sys.argv[2:]))
        """))
    target = tmp_path / "two.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
        str(setup["config"]), f"data.cache_path={target}", "extract.num_workers=1",
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert_same_cache(target, setup["reference"])


def test_interrupted_extraction_resumes_to_the_same_cache(setup, tmp_path, monkeypatch):
    target = tmp_path / "resumed.h5"
    calls = []

    def failing_after(limit):
        def load(*args, **kwargs):
            ae = load_autoencoder(*args, **kwargs)
            encode = ae.encode

            def counted(x):
                calls.append(len(x))
                if len(calls) > limit:
                    raise KeyboardInterrupt("simulated crash")
                return encode(x)

            ae.encode = counted
            return ae

        return load

    monkeypatch.setattr(extract, "load_autoencoder", failing_after(3))
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg_for(setup, f"data.cache_path={target}"))
    folder = parts_folder(target)
    assert sorted(p.name for p in folder.glob("part*.h5")) == ["part000000.h5"]  # 2 batches of 4 per part
    with pytest.raises(FileNotFoundError, match="not finished"):
        read_cache_info(target)

    calls.clear()
    monkeypatch.setattr(extract, "load_autoencoder", failing_after(100))
    extract.run(cfg_for(setup, f"data.cache_path={target}"))
    assert len(calls) == 4  # only parts 1 and 2 (2 batches each) were encoded again
    assert_same_cache(target, setup["reference"])


def test_cache_for_another_image_size_is_an_error(setup):
    with pytest.raises(ValueError, match="image_size 16 there vs 32 now.*Delete"):
        extract.run(cfg_for(setup, "data.image_size=32"))


def test_parts_from_another_setup_are_never_mixed(setup, tmp_path, monkeypatch):
    target = tmp_path / "mixed.h5"
    images = shutil.copytree(setup["images"], tmp_path / "images")

    def crash(*args, **kwargs):
        ae = load_autoencoder(*args, **kwargs)
        ae.encode = lambda x: (_ for _ in ()).throw(KeyboardInterrupt())
        return ae

    monkeypatch.setattr(extract, "load_autoencoder", crash)
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg_for(setup, f"data.cache_path={target}", f"data.image_root={images}"))
    monkeypatch.undo()
    assert (parts_folder(target) / "manifest.json").is_file()
    with pytest.raises(ValueError, match=f"{parts_folder(target)}.*image_size 16 there vs 32 now"):
        extract.run(cfg_for(setup, f"data.cache_path={target}", f"data.image_root={images}", "data.image_size=32"))
    with pytest.raises(ValueError, match="autoencoder"):
        extract.run(cfg_for(setup, f"data.cache_path={target}", f"data.image_root={images}", "autoencoder.name=identity"))
    (images / "cat" / "n0.png").rename(images / "cat" / "renamed.png")
    with pytest.raises(ValueError, match="list of images differs"):
        extract.run(cfg_for(setup, f"data.cache_path={target}", f"data.image_root={images}"))


def test_missing_or_empty_image_root(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract.run(cfg_for(setup, f"data.image_root={tmp_path / 'missing'}", f"data.cache_path={tmp_path / 'c.h5'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        extract.run(cfg_for(setup, f"data.image_root={tmp_path / 'empty'}", f"data.cache_path={tmp_path / 'c.h5'}"))
    with pytest.raises(ValueError, match="image_root is not set"):
        extract.run(cfg_for(setup, "data.image_root=null", f"data.cache_path={tmp_path / 'c.h5'}"))
    assert not (tmp_path / "c.h5").exists() and not parts_folder(tmp_path / "c.h5").exists()


def test_digits_demo_with_the_identity(setup, tmp_path):
    target = tmp_path / "digits.h5"
    cfg = cfg_for(setup, "data.source=digits", "autoencoder.name=identity", f"data.cache_path={target}",
                  "extract.batch_size=256", "extract.flush_every=2")
    extract.run(cfg)
    info = read_cache_info(target)
    assert info["num_items"] == 1797 and info["latent_shape"] == (1, SIZE, SIZE) and info["scale_factor"] == 1.0
    data = read_all(target)
    np.testing.assert_array_equal(data["labels"], load_digits().target)
    pixels = digits_images(SIZE)[0][:, None].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(data["moments"][:, 0, 0], pixels.astype(np.float16))
    np.testing.assert_array_equal(data["moments"][:, 1, 0], pixels[..., ::-1].astype(np.float16))
    assert not data["moments"][:, :, 1].any()


def test_training_and_sampling_start_from_the_vae_cache(setup, tmp_path):
    """The cache made through a (tiny) AutoencoderKL trains a DiT and decodes samples back to pixels."""
    from phases import sample, train
    from runtime.checkpoint import load_checkpoint

    info = read_cache_info(setup["reference"])
    cfg = cfg_for(setup, f"experiment_dir={tmp_path}", "model.name=DiT-T/2", "model.num_classes=3",
                  "train.batch_size=4", "train.max_steps=2", "train.ckpt_every=2", "train.progress=false",
                  "train.precision=fp32", "data.num_workers=0", "sample.classes=[0,2]", "sample.steps=3",
                  "sample.sampler=ddim", "sample.precision=fp32")
    ckpt = train.run(cfg)
    state = load_checkpoint(ckpt)
    assert state["model_args"]["in_channels"] == info["latent_shape"][0]
    assert state["model_args"]["input_size"] == info["latent_shape"][1]
    assert state["autoencoder"] == {"name": str(setup["vae"]), "scale_factor": info["scale_factor"]}
    grid = sample.run(cfg)
    from PIL import Image

    assert Image.open(tmp_path / "samples" / "0000_class0.png").size == (SIZE, SIZE)
    assert grid.is_file()
