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
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from datasets.center_crop import center_crop_arr, to_rgb


def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (".jpg", ".png", ...) of every format this Pillow can open."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class FolderListing(NamedTuple):
    """What an image folder holds: the files to encode and what was left out, with the reason."""

    paths: list[str]  # "class/.../file", relative to the root
    labels: np.ndarray  # int64, the index of the class folder
    class_names: list[str]
    skipped: list[tuple[str, str]]  # (path, why it is not listed)


def scan_image_folder(root: str | os.PathLike) -> FolderListing:
    """The files of an ImageNet-style folder, in a deterministic order.

    Symbolic links are followed, but every real file is listed once (the first path to it, in
    sorted order), a link back to the root, above it, or to a folder already walked (a/loop -> .)
    is not descended into, and a link into another class folder gives no image another class.
    Errors, before any work starts: a missing root, a root without class folders, a class folder
    without images (torchvision refuses those too, as they shift no label but waste one).
    """
    if root is None or str(root) == "":
        raise ValueError("data.image_root is not set: point it at an ImageNet-style <class>/<image> folder")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.image_root {root} does not exist or is not a folder")
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not class_names:
        raise ValueError(f"data.image_root {root} has no class folders: expected <root>/<class>/<image> files")
    walk = _Walk(root, class_names)
    paths: list[str] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(class_names):
        found = sorted(walk.images_of(name))
        if not found:
            empty.append(name)
        paths.extend(found)
        labels.extend([label] * len(found))
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise ValueError(
            f"data.image_root {root}: {len(empty)} class folder(s) contain no image files ({shown}); "
            "remove them or add images"
        )
    return FolderListing(paths, np.asarray(labels, dtype=np.int64), class_names, walk.skipped)


class _Walk:
    """Walks class folders following links, each real folder and file once."""

    def __init__(self, root: Path, class_names: list[str]):
        self.root = root
        self.root_real = os.path.realpath(root)
        self.class_reals = {os.path.realpath(root / name): name for name in class_names}
        self.extensions = image_extensions()
        self.seen_dirs: set[str] = set()
        self.seen_files: dict[str, str] = {}  # real path -> the listed path
        self.skipped: list[tuple[str, str]] = []

    def images_of(self, name: str) -> list[str]:
        """'class/.../file' paths of the images below class folder `name`."""
        found = []
        self.seen_dirs.add(os.path.realpath(self.root / name))
        for directory, subdirs, files in os.walk(self.root / name, followlinks=True):
            relative = Path(directory).relative_to(self.root).as_posix()
            subdirs[:] = [d for d in sorted(subdirs) if not d.startswith(".") and self._enter(directory, d, relative, name)]
            for file in sorted(files):
                if file.startswith(".") or os.path.splitext(file)[1].lower() not in self.extensions:
                    continue
                path = f"{relative}/{file}"
                reason = self._refuse_file(os.path.realpath(os.path.join(directory, file)), path, name)
                if reason:
                    self.skipped.append((path, reason))
                else:
                    found.append(path)
        return found

    def _enter(self, directory: str, sub: str, relative: str, name: str) -> bool:
        real = os.path.realpath(os.path.join(directory, sub))
        if real in self.seen_dirs:
            reason = "a link to a folder that is already listed (a link loop?)"
        elif real == self.root_real or self.root_real.startswith(real + os.sep):
            reason = "a link to the image root or a folder above it"
        elif self._owner(real) not in (None, name):
            reason = f"a link into class folder {self._owner(real)!r}"
        else:
            self.seen_dirs.add(real)
            return True
        self.skipped.append((f"{relative}/{sub}/", reason))
        return False

    def _refuse_file(self, real: str, path: str, name: str) -> str:
        owner = self._owner(real)
        if owner not in (None, name):
            return f"a link to a file of class folder {owner!r}"
        if real in self.seen_files:
            return f"the same file as {self.seen_files[real]}"
        self.seen_files[real] = path
        return ""

    def _owner(self, real: str) -> str | None:
        """The class whose folder holds this real path (None: outside every class folder)."""
        for folder, name in self.class_reals.items():
            if real == folder or real.startswith(folder + os.sep):
                return name
        return None


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
        self.paths, self.labels, self.class_names, self.skipped = scan_image_folder(root)
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
