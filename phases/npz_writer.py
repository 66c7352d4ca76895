"""Stream arrays into an ADM-format `.npz` without holding them in memory.

An `.npz` is a zip of `.npy` members; each member is written as an npy header followed by
the raw bytes of its chunks, so 50,000 images at 256 px (9.8 GB) never sit in RAM at once.
Stored uncompressed (as `np.savez` does) so readers can memory-map it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from runtime.atomic_file import atomic_write


def write_member(archive: zipfile.ZipFile, name: str, shape: tuple, dtype: np.dtype, chunks: Iterable[np.ndarray]) -> None:
    """Write `name.npy` with the given shape/dtype from C-ordered chunks along axis 0."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    rows = 0
    with archive.open(f"{name}.npy", mode="w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            if chunk.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"{name}: chunk of shape {chunk.shape} does not fit {shape}")
            member.write(chunk.tobytes())
            rows += chunk.shape[0]
    if rows != shape[0]:
        raise ValueError(f"{name}: wrote {rows} rows, expected {shape[0]}")


def write_npz(path: Path, members: list[tuple[str, tuple, np.dtype, Iterable[np.ndarray]]]) -> Path:
    """Write every member to a temporary file, then rename it to `path` (atomic, fsynced)."""
    path = Path(path)
    with atomic_write(path) as handle:
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, shape, dtype, chunks in members:
                write_member(archive, name, shape, dtype, chunks)
    return path
