"""Two quality numbers for the demo's generated digits: class fidelity and a Frechet distance.

    python scripts/digits_accuracy.py runs/demo_digits_flow/inference/samples.npz [more.npz ...]

A support-vector classifier (scikit-learn, RBF kernel) is fitted on the real 16x16 digits (the demo's data,
scaled to [0, 1]); each `.npz` of `-p inference` (arr_0 uint8 images, arr_1 their labels) is scored by the share
of images it classifies as their label. Real held-out digits score about 0.99 with it (printed first), so a
model near that draws the right digit nearly always; blurry or wrong digits lower it. It sees class fidelity,
not diversity. The second number sees both: the Frechet distance (FID's formula, metrics/frechet.py) between the
images and all real digits in the space of the real digits' first 32 principal components (scikit-learn's PCA),
a pixel-statistics FD; 1,000 real digits drawn from the 1,797 give 0.03 on it. Checks between demo runs, not
FID.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.digits import digits_images  # noqa: E402
from metrics.frechet import feature_statistics, frechet_distance  # noqa: E402

COMPONENTS = 32


def classifier(holdout: int = 300, seed: int = 0):
    """(the SVC fitted on all real digits but `holdout` random ones, its accuracy on those)."""
    from sklearn.svm import SVC

    images, labels = digits_images(16)
    x = images.reshape(len(images), -1) / 255.0
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:holdout], order[holdout:]
    held_out = SVC(gamma="scale").fit(x[train], labels[train]).score(x[test], labels[test])
    return SVC(gamma="scale").fit(x, labels), held_out


class PixelFrechet:
    """FD in the real digits' PCA space, against the statistics of all real digits."""

    def __init__(self):
        from sklearn.decomposition import PCA

        images, _ = digits_images(16)
        real = images.reshape(len(images), -1) / 255.0
        self.pca = PCA(COMPONENTS, random_state=0).fit(real)
        self.reference = feature_statistics(self.pca.transform(real))

    def __call__(self, flat: np.ndarray) -> float:
        return frechet_distance(*feature_statistics(self.pca.transform(flat)), *self.reference)


def flat_images(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """([N, 256] in [0, 1], labels [N]) from an inference `.npz`."""
    with np.load(npz) as data:
        images, labels = data["arr_0"], data["arr_1"]
    grey = images.astype(np.float64).mean(axis=-1) if images.ndim == 4 else images.astype(np.float64)
    if grey.shape[1:] != (16, 16):
        raise SystemExit(f"{npz}: images of {grey.shape[1:]} pixels, not the demo's 16x16 digits")
    return grey.reshape(len(grey), -1) / 255.0, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("npz", nargs="+", type=Path)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.npz if not p.is_file()]
    if missing:
        raise SystemExit(f"no such file: {', '.join(missing)}")
    model, held_out = classifier()
    fd = PixelFrechet()
    images, _ = digits_images(16)
    real = images.reshape(len(images), -1)[np.random.default_rng(0).permutation(len(images))[:1000]] / 255.0
    print(f"real digits: {held_out:.3f} of 300 held out classified right; FD of 1,000 real ones {fd(real):.2f}")
    for npz in args.npz:
        flat, labels = flat_images(npz)
        print(f"{npz}: {model.score(flat, labels):.3f} of {len(flat)} images are the digit asked for; "
              f"pixel FD {fd(flat):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
