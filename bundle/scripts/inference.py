"""Whole-volume inference: crop-aware sliding windows, the inference datalist and demo case, previews.

:class:`CropSlidingWindowInferer` tiles a volume with the network's *output* cubes. A network that maps a
``roi``³ window to its central ``(roi − 2·margin)``³ is applied at a stride of exactly ``roi − 2·margin``, after
the volume has been zero-padded by ``margin`` (and up to a whole number of tiles), so every output voxel comes
from exactly one window and no blending is needed. MONAI's ``SlidingWindowInferer`` would read a smaller output
as a zoomed one and blend, so it is not used here.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.transforms import MapTransform

from .io import atomic_output

__all__ = [
    "CropSlidingWindowInferer",
    "inference_datalist",
    "write_demo_case",
    "DefaultMaskd",
    "SavePreviewd",
    "CaseReport",
    "preview_image",
    "output_stem",
    "file_stem",
]


def file_stem(path: str) -> str:
    """File name without folder and image extension (``/data/sub-01_field.nii.gz`` → ``sub-01_field``)."""
    base = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha", ".gz"):
        if base.endswith(ext):
            return base[: -len(ext)]
    return base


def output_stem(image) -> str:
    """File stem of the input a MetaTensor was read from (``sub-01_field.nii.gz`` → ``sub-01_field``)."""
    return file_stem(str(getattr(image, "meta", {}).get("filename_or_obj", "case")))


class CropSlidingWindowInferer(Inferer):
    """Sliding-window inference for networks with a centre-crop head (64³ in → 48³ out).

    Keywords:
        roi_size: window edge in voxels (network input), e.g. 64.
        margin: voxels the network crops from each side (8 for 64 → 48).
        sw_batch_size: windows per forward pass.
        sw_device: device the windows run on (default: the input's device); the stitched output stays on the
            input's device, so a large volume can live in CPU memory while windows run on the GPU.
        skip_empty: skip windows whose output tile sees only zeros in the input (outside the mask the field is
            zero, and the output is masked there); their output is 0.
        progress: show a tqdm progress bar.

    A network with a ``prepare_input`` method (:class:`scripts.networks.QSMGenerator`) gets the whole volume
    through it first, so that channels computed over the whole region (a k-space estimate of χ) reach every window.

    Shapes:
        inputs (B, 1, X, Y, Z), any X, Y, Z → output (B, C, X, Y, Z).
    """

    def __init__(
        self,
        roi_size: int = 64,
        margin: int = 8,
        sw_batch_size: int = 4,
        sw_device: str | torch.device | None = None,
        skip_empty: bool = True,
        progress: bool = False,
    ) -> None:
        super().__init__()
        if roi_size <= 2 * margin or margin < 0:
            raise ValueError(f"need roi_size > 2 * margin >= 0, got roi_size={roi_size}, margin={margin}")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size, self.margin = int(roi_size), int(margin)
        self.tile = self.roi_size - 2 * self.margin
        self.sw_batch_size = int(sw_batch_size)
        self.sw_device = sw_device
        self.skip_empty = bool(skip_empty)
        self.progress = bool(progress)

    def window_starts(self, spatial_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """Corners of the output tiles (= of the input windows in the padded frame), in voxels."""
        counts = [max(1, math.ceil(s / self.tile)) for s in spatial_shape]
        return [tuple(i * self.tile for i in idx) for idx in itertools.product(*(range(c) for c in counts))]

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:  # type: ignore[override]
        if inputs.ndim != 5:
            raise ValueError(f"expected (B, C, X, Y, Z) inputs, got shape {tuple(inputs.shape)}")
        spatial = inputs.shape[-3:]
        m, t = self.margin, self.tile
        counts = [max(1, math.ceil(s / t)) for s in spatial]
        after = [c * t - s + m for c, s in zip(counts, spatial)]
        raw = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        # a generator that reads whole-region channels (an estimate of χ) makes them here, before tiling
        prepare = getattr(getattr(network, "module", network), "prepare_input", None)
        if callable(prepare):
            raw = prepare(raw)
        # zeros outside the volume, as the network saw outside masks in training
        padded = torch.nn.functional.pad(raw, (m, after[2], m, after[1], m, after[0]))
        device = torch.device(self.sw_device) if self.sw_device is not None else inputs.device
        starts = self.window_starts(spatial)
        output: torch.Tensor | None = None
        todo = [(b, s) for b in range(inputs.shape[0]) for s in starts]
        if self.skip_empty:
            todo = [(b, s) for b, s in todo if bool(padded[b, :, *self._slices(s, m, t)].any())]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="windows", unit="win")
        for i in range(0, len(todo), self.sw_batch_size):
            chunk = todo[i : i + self.sw_batch_size]
            windows = torch.stack([padded[b, :, *self._slices(s, 0, self.roi_size)] for b, s in chunk]).to(device)
            tiles = network(windows, *args, **kwargs)
            if tiles.shape[-3:] != (t, t, t):
                raise ValueError(
                    f"network output {tuple(tiles.shape[-3:])} is not the central {t}³ of its {self.roi_size}³ "
                    f"input: check roi_size and margin"
                )
            if output is None:
                output = raw.new_zeros((raw.shape[0], tiles.shape[1], *(c * t for c in counts)))
            for (b, s), tile in zip(chunk, tiles.to(output.device, output.dtype)):
                output[b, :, *self._slices(s, 0, t)] = tile
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if output is None:  # every window skipped: nothing but zeros in the input
            output = raw.new_zeros((raw.shape[0], 1, *(c * t for c in counts)))
        output = output[..., : spatial[0], : spatial[1], : spatial[2]].contiguous()
        if isinstance(inputs, MetaTensor):  # same grid as the input: keep its affine and header
            output = MetaTensor(output, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return output

    @staticmethod
    def _slices(start: Sequence[int], offset: int, size: int) -> tuple[slice, ...]:
        return tuple(slice(s + offset, s + offset + size) for s in start)


def write_demo_case(output_dir: str, seed: int = 2024, shape: Sequence[int] = (160, 192, 160)) -> dict[str, str]:
    """Simulate the built-in demo case and write it as NIfTI into ``output_dir/demo_input``.

    The demo is a 1 mm brain phantom (:class:`scripts.phantoms.BrainPhantom`, B0 along the third axis) with four
    cerebral microbleeds, a lesion type never inserted during training; its field carries noise at SNR 40.

    Writes ``field.nii.gz`` (local field, ppm), ``mask.nii.gz``, ``chi_truth.nii.gz`` (χ, ppm), ``labels.nii.gz``
    (tissue labels) and ``lesion_ids.nii.gz`` (one id per microbleed) and returns a datalist item
    ``{"image", "mask", "label"}`` of the first three.
    """
    import nibabel as nib

    from .data import simulate_case
    from .phantoms import BrainPhantom

    case = simulate_case(
        BrainPhantom(lesions={"microbleed": 4}), shape, (1.0, 1.0, 1.0), (0.0, 0.0, 1.0), snr=40.0, seed=seed
    )
    folder = os.path.join(output_dir, "demo_input")
    os.makedirs(folder, exist_ok=True)
    paths = {}
    names = {"image": "field", "mask": "mask", "label": "chi_truth", "labels": "labels", "lesion_ids": "lesion_ids"}
    sources = {"image": "field", "mask": "mask", "label": "chi", "labels": "labels", "lesion_ids": "lesion_ids"}
    for key, name in names.items():
        volume = case[sources[key]].numpy()
        volume = volume.astype(np.int16 if key in ("labels", "lesion_ids") else np.float32)
        path = os.path.join(folder, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(volume, case["affine"].numpy()), path)
        if key in ("image", "mask", "label"):
            paths[key] = path
    return paths


def inference_datalist(
    field: str | None = None,
    mask: str | None = None,
    datalist: str | None = None,
    output_dir: str = "./outputs",
    demo_seed: int = 2024,
) -> list[dict[str, str]]:
    """The list of cases to reconstruct.

    Arguments:
        field: one local field NIfTI (ppm unless ``field_unit`` says otherwise).
        mask: its brain mask NIfTI (optional; without it the mask is where the field is non-zero).
        datalist: a MONAI datalist JSON; its ``testing`` items (else ``validation``, else ``training``) with
            ``image`` (field), optional ``mask`` and optional ``label`` (true χ, reported against).
        output_dir: where the demo case is written when neither ``field`` nor ``datalist`` is given.
    """
    if field is not None and datalist is not None:
        raise ValueError("give either --field (one case) or --datalist (many cases), not both")
    if field is not None:
        item = {"image": os.path.abspath(field)}
        if mask is not None:
            item["mask"] = os.path.abspath(mask)
        return [item]
    if datalist is not None:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist {datalist!r} does not exist")
        with open(datalist) as f:
            content = json.load(f)
        base = os.path.dirname(os.path.abspath(datalist))
        for key in ("testing", "validation", "training"):
            if content.get(key):
                items = content[key]
                break
        else:
            raise ValueError(f"datalist {datalist!r} has no 'testing', 'validation' or 'training' items")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"image": item}
            if "image" not in item:
                raise ValueError(f"datalist {datalist!r} item {i} has no 'image' (local field) entry")
            out.append({k: os.path.join(base, v) for k, v in item.items() if k in ("image", "mask", "label")})
        return out
    return [write_demo_case(output_dir, seed=demo_seed)]


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
        overwrite: bool = True,
    ) -> None:
        from .io import as_bool

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


class DefaultMaskd(MapTransform):
    """Give a case without a ``mask`` one: the voxels where the field is non-zero (and finite)."""

    def __init__(self, keys="image", mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data):
        d = dict(data)
        if d.get(self.mask_key) is None:
            key = self.first_key(d)
            field = torch.as_tensor(d[key])
            d[self.mask_key] = ((field != 0) & torch.isfinite(field)).float()
        return d


def voxel_size_from_affine(affine) -> tuple[float, float, float]:
    """Voxel size (mm) from a voxel-to-world affine: the lengths of its first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))  # type: ignore[return-value]


class CaseReport:
    """Log, per reconstructed case, how it compares with the known truth and with TKD on the same field.

    Cases that come with a ``label`` (true χ) get NRMSE (%), XSIM and HFEN (%) of the network and of TKD
    (δ = 0.15) inside the mask, logged and written to ``{output_dir}/metrics.json``.
    """

    def __init__(self, output_dir: str = "./outputs", tkd_threshold: float = 0.15) -> None:
        self.output_dir, self.tkd_threshold = output_dir, float(tkd_threshold)
        self.records: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def iteration(self, engine) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in outputs:
            if item.get("label") is not None:
                self.report(item)

    def report(self, item: dict) -> None:
        """Compare one case (``image``, ``label``, ``eval_mask``, ``pred``) with its truth, and TKD with it."""
        import logging

        from .baselines import tkd
        from .metrics import hfen, nrmse, xsim
        from .physics import b0_direction_from_affine

        field, truth, mask = (item[k].detach().cpu().float()[0] for k in ("image", "label", "eval_mask"))
        affine = item["image"].affine if hasattr(item["image"], "affine") else np.eye(4)
        voxel, b0 = voxel_size_from_affine(affine), b0_direction_from_affine(affine)
        chi_tkd = tkd(field, mask, voxel, tuple(b0), threshold=self.tkd_threshold)
        record = {"case": output_stem(item["image"])}
        for method, chi in (("network", item["pred"].detach().cpu().float()[0]), ("tkd", chi_tkd)):
            record[method] = {
                "nrmse_percent": nrmse(chi, truth, mask),
                "xsim": xsim(chi, truth, mask),
                "hfen_percent": hfen(chi, truth, mask),
            }
        self.records.append(record)
        net, ref = record["network"], record["tkd"]
        logging.getLogger("CaseReport").info(
            f"{record['case']}: network NRMSE {net['nrmse_percent']:.1f} %, XSIM {net['xsim']:.3f}, "
            f"HFEN {net['hfen_percent']:.1f} % | TKD NRMSE {ref['nrmse_percent']:.1f} %, "
            f"XSIM {ref['xsim']:.3f}, HFEN {ref['hfen_percent']:.1f} %"
        )

    def completed(self, engine) -> None:
        if self.records:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "metrics.json"), "w") as f:
                json.dump(self.records, f, indent=2)
