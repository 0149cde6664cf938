"""Safe outputs: every file is written under a temporary name and renamed; inputs are only ever read.

:func:`atomic_output` writes beside the final path and renames (``os.replace``); an existing output is replaced only
with ``overwrite``. :class:`SaveNiftid` writes χ and the residual with the input's header and affine,
:class:`SavePreviewd` a PNG of three slices, :class:`SaveReportd` the per-case record as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .checks import OUTPUT_SUFFIXES, as_bool, case_info, output_paths, output_stem, source_filename

__all__ = ["atomic_output", "SaveNiftid", "SaveReportd", "SavePreviewd", "preview_image"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_output(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` to write to; on success it is renamed to ``path`` (``os.replace``).

    The temporary name ends with the final name, so writers that pick a format from the extension still do. An
    existing ``path`` raises ``FileExistsError`` unless ``overwrite``; on any error the temporary file is removed.
    """
    path = os.path.abspath(path)
    folder, name = os.path.split(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(f"{path} already exists; pass --overwrite true to replace it")
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        yield tmp
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; pass --overwrite true to replace it")
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


class SaveNiftid(MapTransform):
    """Write ``keys`` as float32 NIfTI ``{output_dir}/{input stem}_{postfix}.nii.gz``, atomically.

    The volume must be on the input grid; the input file's header (orientation codes, units, …) and affine are
    reused, with the data type set to float32 and no scaling.
    """

    def __init__(
        self,
        keys,
        output_dir: str = "./outputs",
        postfix: str | Sequence[str] = "chi",
        overwrite: bool = False,
        description: str | Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        n = len(self.keys)
        self.postfixes = [postfix] * n if isinstance(postfix, str) else list(postfix)
        if len(self.postfixes) != n:
            raise ValueError(f"need one postfix per key, got {postfix!r} for {self.keys}")
        desc = description if description is not None else [f"QSMGAN {p} (ppm)" for p in self.postfixes]
        self.descriptions = [desc] * n if isinstance(desc, str) else list(desc)
        self.output_dir = output_dir
        self.overwrite = as_bool(overwrite, "overwrite")

    def __call__(self, data):
        import nibabel as nib

        d = dict(data)
        for key, postfix, desc in zip(self.keys, self.postfixes, self.descriptions):
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(key)
            img = d[key]
            array = np.asarray(torch.as_tensor(img).detach().cpu().float())[0]
            affine = np.asarray(img.affine, dtype=np.float64) if isinstance(img, MetaTensor) else np.eye(4)
            header, klass = None, nib.Nifti1Image
            source = source_filename(img)
            if os.path.isfile(source):
                with contextlib.suppress(Exception):
                    ref = nib.load(source)
                    if isinstance(ref, (nib.Nifti1Image, nib.Nifti2Image)) and tuple(ref.shape[:3]) == array.shape:
                        header, affine, klass = ref.header.copy(), ref.affine, type(ref)
            out = klass(array, affine, header)
            out.set_data_dtype(np.float32)
            out.header["descrip"] = desc[:79].encode("ascii", "replace")
            out.header["cal_min"] = out.header["cal_max"] = 0
            path = os.path.join(self.output_dir, f"{output_stem(img)}_{postfix}.nii.gz")
            with atomic_output(path, self.overwrite) as tmp:
                nib.save(out, tmp)
            logger.info(f"wrote {path}")
        return d


class SaveReportd(MapTransform):
    """Write the per-case record (``qsm_info``: input, units, grid, residual …) as ``{stem}_report.json``."""

    def __init__(self, keys="pred", output_dir: str = "./outputs", overwrite: bool = False) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir = output_dir
        self.overwrite = as_bool(overwrite, "overwrite")

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            stem = output_stem(d[key])
            record = {"case": stem, **case_info(d)}
            record["outputs"] = {
                k: p for k, p in output_paths(os.path.abspath(self.output_dir), stem).items() if os.path.exists(p)
            }
            path = os.path.join(self.output_dir, stem + OUTPUT_SUFFIXES["report"])
            record["outputs"]["report"] = os.path.abspath(path)
            with atomic_output(path, self.overwrite) as tmp:
                with open(tmp, "w") as f:
                    json.dump(record, f, indent=2)
        return d


def preview_image(volumes: Sequence[np.ndarray], window: tuple[float, float] = (-0.15, 0.25), center=None):
    """A Pillow image with one row per volume: axial, coronal and sagittal slices, grey window ``window`` (ppm).

    Arguments:
        volumes: 3D arrays (X, Y, Z) of the same shape, in RAS-like voxel order (slices are shown with
            anterior/superior up).
        center: voxel (x, y, z) the slices pass through (default: the middle of the volume).
    """
    from PIL import Image

    shape = volumes[0].shape
    cx, cy, cz = center if center is not None else [s // 2 for s in shape]
    lo, hi = window
    rows = []
    for vol in volumes:
        views = [vol[:, :, cz], vol[:, cy, :], vol[cx, :, :]]  # axial, coronal, sagittal
        tiles = [np.rot90(np.clip((v - lo) / (hi - lo), 0, 1)) for v in views]
        height = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 2))) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows], axis=0)
    return Image.fromarray((canvas * 255).astype(np.uint8), mode="L")


def _centre(profile: np.ndarray) -> int:
    return int(round(float(np.average(np.arange(len(profile)), weights=profile))))


class SavePreviewd(MapTransform):
    """Write a PNG preview (axial, coronal, sagittal slices) of ``keys`` beside the NIfTI output.

    The file is ``{output_dir}/{input name}_chi.png``; with ``truth_key`` present, the true χ is a second row.
    Slices pass through the centre of mass of the mask when ``mask_key`` is present. It is written under a temporary
    name and renamed; an existing file is replaced only with ``overwrite``.
    """

    def __init__(
        self,
        keys="pred",
        output_dir: str = "./outputs",
        output_postfix: str = "chi",
        mask_key: str = "eval_mask",
        truth_key: str = "label",
        window: Sequence[float] = (-0.15, 0.25),
        overwrite: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir, self.postfix = output_dir, output_postfix
        self.mask_key, self.truth_key = mask_key, truth_key
        self.window = (float(window[0]), float(window[1]))
        self.overwrite = as_bool(overwrite, "overwrite")

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            vol = np.asarray(d[key].detach().cpu())[0]
            rows = [vol]
            if self.truth_key in d and d[self.truth_key] is not None:
                rows.insert(0, np.asarray(d[self.truth_key].detach().cpu())[0])
            center = None
            if self.mask_key in d:
                m = np.asarray(d[self.mask_key].detach().cpu())[0] > 0
                if m.any():  # centre of mass from the three projections (no index arrays of the whole mask)
                    center = [_centre(m.sum(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
            path = os.path.join(self.output_dir, f"{output_stem(d[key])}_{self.postfix}.png")
            with atomic_output(path, self.overwrite) as tmp:
                preview_image(rows, self.window, center).save(tmp)
        return d
