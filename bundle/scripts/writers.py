"""Safe outputs: every file is written under a temporary name and renamed; inputs are only ever read.

:func:`atomic_output` writes beside the final path and renames (``os.replace``); an existing output is replaced only
with ``overwrite``. :class:`SaveNiftid` writes χ and the residual with the input's header and affine,
:class:`SavePreviewd` a PNG of three slices (RAS, true aspect, labelled, with a colour bar), :class:`SaveReportd`
the per-case record as JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .checks import OUTPUT_SUFFIXES, as_bool, case_info, output_paths, output_stem, source_filename

__all__ = ["atomic_output", "SaveNiftid", "SaveReportd", "SavePreviewd", "preview_image", "annotated_preview", "to_ras"]

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
    reused, with the data type set to float32 and no scaling. The files are compressed side by side, one thread each
    up to torch's thread count (zlib releases the GIL), and logged in ``keys`` order.
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
        jobs = []
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
            jobs.append((out, os.path.join(self.output_dir, f"{output_stem(img)}_{postfix}.nii.gz")))

        def write(job) -> str:
            out, path = job
            with atomic_output(path, self.overwrite) as tmp:
                nib.save(out, tmp)
            return path

        with ThreadPoolExecutor(max(1, min(len(jobs), torch.get_num_threads()))) as pool:
            for path in pool.map(write, jobs):
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


def ras_plan(affine, shape: Sequence[int]):
    """How to show a volume stored with ``affine`` in RAS voxel order (nibabel orientations).

    Returns ``(transform, voxel_sizes, to_ras)``: the nibabel orientation transform (input axis → RAS axis, flip),
    the voxel sizes (mm) in RAS order, and a function that maps a voxel index of the stored volume to its index in
    the reoriented one. Without an affine (or a degenerate one) the volume is taken as RAS with 1 mm voxels.
    """
    import nibabel.orientations as nio

    shape = tuple(int(n) for n in shape[:3])
    if affine is None:
        return None, (1.0, 1.0, 1.0), lambda c: tuple(int(v) for v in c)
    affine = np.asarray(affine, dtype=np.float64)
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    try:
        ornt = nio.io_orientation(affine)
        if np.isnan(ornt).any():
            raise ValueError("degenerate affine")
        transform = nio.ornt_transform(ornt, nio.axcodes2ornt(("R", "A", "S")))
    except Exception:
        return None, tuple(float(v) for v in vox), lambda c: tuple(int(v) for v in c)
    sizes = [1.0, 1.0, 1.0]
    for j in range(3):
        sizes[int(transform[j, 0])] = float(vox[j])

    def to_ras(index):
        out = [0, 0, 0]
        for j in range(3):
            i = int(index[j])
            out[int(transform[j, 0])] = i if transform[j, 1] > 0 else shape[j] - 1 - i
        return tuple(out)

    return transform, tuple(sizes), to_ras


def to_ras(volume: np.ndarray, affine) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``volume`` (X, Y, Z) reoriented to RAS voxel order, and its voxel sizes (mm) in that order."""
    import nibabel.orientations as nio

    transform, sizes, _ = ras_plan(affine, volume.shape)
    if transform is None:
        return np.asarray(volume), sizes
    return np.ascontiguousarray(nio.apply_orientation(np.asarray(volume), transform)), sizes


def _tile(view: np.ndarray, col_mm: float, row_mm: float, pixel_mm: float) -> np.ndarray:
    """A 2D slice (cols, rows) as display pixels: rows upward, each pixel ``pixel_mm`` square (bilinear)."""
    from PIL import Image

    tile = np.rot90(view).astype(np.float32)  # first axis across, second axis up
    height = max(1, int(round(tile.shape[0] * row_mm / pixel_mm)))
    width = max(1, int(round(tile.shape[1] * col_mm / pixel_mm)))
    if (height, width) != tile.shape:
        tile = np.asarray(Image.fromarray(np.ascontiguousarray(tile), mode="F").resize((width, height), Image.BILINEAR))
    return tile


def preview_tiles(volumes, window, center=None, affine=None):
    """The grey tiles of :func:`preview_image` as a float array in [0, 1] and the width of each view."""
    sizes, plan_center = (1.0, 1.0, 1.0), None
    if affine is not None:
        transform, sizes, mapping = ras_plan(affine, volumes[0].shape)
        if center is not None:
            plan_center = mapping(center)
        volumes = [to_ras(v, affine)[0] for v in volumes]
    else:
        plan_center = None if center is None else tuple(int(c) for c in center)
    shape = volumes[0].shape
    cx, cy, cz = plan_center if plan_center is not None else [s // 2 for s in shape]
    vx, vy, vz = sizes
    pixel = min(sizes)
    lo, hi = window
    rows, widths = [], []
    for vol in volumes:
        views = [(vol[:, :, cz], vx, vy), (vol[:, cy, :], vx, vz), (vol[cx, :, :], vy, vz)]  # axial, coronal, sagittal
        tiles = [np.clip((_tile(v, a, b, pixel) - lo) / (hi - lo), 0, 1) for v, a, b in views]
        widths = [t.shape[1] for t in tiles]
        height = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 2))) for t in tiles]
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 2), (0, width - r.shape[1]))) for r in rows], axis=0)
    return canvas, widths


def preview_image(volumes: Sequence[np.ndarray], window: tuple[float, float] = (-0.15, 0.25), center=None, affine=None):
    """A Pillow image with one row per volume: axial, coronal and sagittal slices, grey window ``window`` (ppm).

    With ``affine`` (the volumes' voxel-to-world matrix) the volumes are first reoriented to RAS
    (:func:`to_ras`), so the slices look the same whatever the storage order (LPS, RAS, …), and each view is
    resampled to square pixels of the smallest voxel size (bilinear), so anisotropic voxels keep their aspect.
    Views: axial (patient left on the left, anterior up), coronal (left on the left, superior up), sagittal
    (posterior on the left, superior up). Without ``affine``: RAS voxel order and isotropic voxels are assumed.

    Arguments:
        volumes: 3D arrays (X, Y, Z) of the same shape and affine.
        center: voxel (x, y, z) of the stored volume the slices pass through (default: the middle of the volume).
    """
    from PIL import Image

    canvas, _ = preview_tiles(volumes, window, center, affine)
    return Image.fromarray((canvas * 255).astype(np.uint8), mode="L")


#: Height (px) of a line of text in the preview (Pillow's default font).
_LINE = 12


def annotated_preview(
    volumes: Sequence[np.ndarray],
    names: Sequence[str],
    window: tuple[float, float] = (-0.15, 0.25),
    center=None,
    affine=None,
    title: str = "",
):
    """:func:`preview_image` with a title, the window in ppm, view and row names, and a grey colour bar (Pillow).

    Layout: a title line (``title`` and the window), a line naming the views (with their orientation), then per
    volume a line with its name (e.g. ``"network + refinement"``, ``"truth"``) above its three slices; the colour
    bar (window top to bottom, in ppm) on the right of the first row.
    """
    from PIL import Image, ImageDraw

    lo, hi = float(window[0]), float(window[1])
    tiles, widths = preview_tiles(volumes, (lo, hi), center, affine)
    n = len(volumes)
    row_h = tiles.shape[0] // n
    bar_w, bar_gap, text_w = 12, 8, 64
    heading = f"{title} | window [{lo:g}, {hi:g}] ppm" if title else f"window [{lo:g}, {hi:g}] ppm"
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    needed = max([measure.textlength(heading)] + [measure.textlength(str(name)) for name in names])
    width = max(tiles.shape[1] + bar_gap + bar_w + text_w, int(np.ceil(needed)) + 4)
    height = 2 * _LINE + n * (_LINE + row_h) + 4
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 0), heading, fill=255)
    x = 0
    for label, w in zip(("axial (L|R, A up)", "coronal (L|R, S up)", "sagittal (P|A, S up)"), widths):
        draw.text((x + 2, _LINE), label, fill=200)
        x += w + 2
    y = 2 * _LINE
    image = Image.fromarray((tiles * 255).astype(np.uint8), mode="L")
    for i, name in enumerate(names):
        draw.text((2, y), str(name), fill=255)
        y += _LINE
        canvas.paste(image.crop((0, i * row_h, tiles.shape[1], (i + 1) * row_h)), (0, y))
        if i == 0:  # colour bar beside the first row: hi at the top, lo at the bottom
            bar_h = max(row_h - 2, 2)
            ramp = np.linspace(1, 0, bar_h, dtype=np.float32)[:, None].repeat(bar_w, axis=1)
            x0 = tiles.shape[1] + bar_gap
            canvas.paste(Image.fromarray((ramp * 255).astype(np.uint8), mode="L"), (x0, y))
            draw.text((x0 + bar_w + 3, y), f"{hi:g}", fill=255)
            draw.text((x0 + bar_w + 3, y + bar_h - _LINE + 2), f"{lo:g} ppm", fill=255)
            if lo < 0 < hi:
                y0 = y + int(round((hi / (hi - lo)) * (bar_h - 1)))
                if _LINE <= y0 - y <= bar_h - 2 * _LINE:
                    draw.text((x0 + bar_w + 3, y0 - _LINE // 2), "0", fill=255)
        y += row_h
    return canvas


def _centre(profile: np.ndarray) -> int:
    return int(round(float(np.average(np.arange(len(profile)), weights=profile))))


class SavePreviewd(MapTransform):
    """Write a PNG preview (axial, coronal, sagittal slices) of ``keys`` beside the NIfTI output.

    The file is ``{output_dir}/{input name}_chi.png`` (:func:`annotated_preview`): slices in RAS orientation with
    the voxels' aspect (from the χ's affine), a title with the case, the method (``"network + refinement"`` when
    the refinement ran, else ``"network alone"``) and the grey window in ppm, and a colour bar. With ``truth_key``
    present, the true χ is the first row. Slices pass through the centre of mass of the mask when ``mask_key`` is
    present. It is written under a temporary name and renamed; an existing file is replaced only with
    ``overwrite``.
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
        refined = case_info(d).get("physics_check", {}).get("dc_weight") is not None
        for key in self.key_iterator(d):
            vol = np.asarray(d[key].detach().cpu())[0]
            affine = np.asarray(d[key].affine, dtype=np.float64) if isinstance(d[key], MetaTensor) else None
            rows, names = [vol], ["network + refinement" if refined else "network alone"]
            if self.truth_key in d and d[self.truth_key] is not None:
                rows.insert(0, np.asarray(d[self.truth_key].detach().cpu())[0])
                names.insert(0, "truth (label)")
            center = None
            if self.mask_key in d:
                m = np.asarray(d[self.mask_key].detach().cpu())[0] > 0
                if m.any():  # centre of mass from the three projections (no index arrays of the whole mask)
                    center = [_centre(m.sum(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
            path = os.path.join(self.output_dir, f"{output_stem(d[key])}_{self.postfix}.png")
            with atomic_output(path, self.overwrite) as tmp:
                stem = output_stem(d[key])
                title = f"{stem}: chi (ppm), {names[-1]}"
                annotated_preview(rows, names, self.window, center, affine, title).save(tmp)
        return d
