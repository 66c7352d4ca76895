"""ImageNet-style `<root>/<class>/<file>` folder as a source of uint8 images for extraction.

Classes are the sorted sub-folder names (torchvision ImageFolder's order, so labels match
DiT's); inside a class, files are found recursively and sorted by their relative path, so the
item list is deterministic on every machine and every rank. A file is listed when Pillow
knows its extension; whether it really decodes is only found out when it is read: an
unreadable file comes back as an error string (the extract phase logs and skips it) and
never stops the run.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.center_crop import center_crop_arr, to_rgb


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (".jpg", ".png", ...) of every format this Pillow can open."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """(relative paths "class/.../file", int64 labels, class names) of an ImageNet-style folder.

    Errors, before any work starts: a missing root, a root without class folders, a class
    folder without images (torchvision refuses those too, as they shift no label but waste one).
    """
    if root is None or str(root) == "":
        raise ValueError("data.image_root is not set: point it at an ImageNet-style <class>/<image> folder")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_root {root} does not exist or is not a folder")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        raise ValueError(f"data.image_root {root} has no class folders: expected <root>/<class>/<image> files")
    extensions = image_extensions()
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(class_names):
        found = sorted(_images_below(root / name, extensions))
        if not found:
            empty.append(name)
        paths.extend(f"{name}/{relative}" for relative in found)
        labels.extend([label] * len(found))
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(
            f"data.image_root {root}: {len(empty)} class folder(s) contain no image files ({shown}); "
            "remove them or add images"
        )
    return paths, np.asarray(labels, dtype=np.int64), class_names


def _images_below(folder: Path, extensions: frozenset[str]) -> list[str]:
    """Image files under `folder` (recursive, following links), as '/'-joined relative paths."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        relative_dir = Path(directory).relative_to(folder)
        for name in files:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append((relative_dir / name).as_posix())
    return found


def load_image(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Decode one file to the ADM-cropped uint8 RGB array [image_size, image_size, 3]."""
    with Image.open(path) as image:
        image.load()
        return np.asarray(center_crop_arr(to_rgb(image), image_size))


class ImageFolderSource(Dataset):
    """Item i -> (i, uint8 tensor [3, S, S], error): error is "" or why the file could not be read.

    A failed item carries a zero image so that batches keep their shape; the caller drops it.
    """

    channels = 3

    def __init__(self, root: str | os.PathLike, image_size: int):
        self.paths, self.labels, self.class_names = scan_image_folder(root)
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            pixels = load_image(self.root / self.paths[index], self.image_size)
        except Exception as err:  # any decoding failure (truncated, not an image, bomb...) skips the file
            blank = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8)
            return index, blank, f"{type(err).__name__}: {err}"
        return index, torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), ""
