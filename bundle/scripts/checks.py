"""Input checks: every case, the settings and the output folder are checked before anything is written.

:func:`checked_cases` (the ``cases`` of ``configs/inference.json``) stops the run (non-zero exit) with one message
that names each file and its problem: missing or unreadable files, volumes that are not 3D (multi-echo data is
refused with a hint), NaN/Inf (refused, or left out of the mask with ``nonfinite: "mask"``), a mask on another
grid, an empty mask, values implausible for the stated unit, an unwritable output directory, outputs that exist
already (kept unless ``overwrite``). The settings parsers here (:class:`FieldSettings`, :func:`as_bool`, …) are
shared by the transforms of :mod:`scripts.grid`, :mod:`scripts.refine` and :mod:`scripts.writers`, which also keep
their per-case record under :data:`INFO_KEY`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .physics import FIELD_UNITS, convert_field

__all__ = [
    "InputError",
    "FieldSettings",
    "NONFINITE_POLICIES",
    "FIELD_KINDS",
    "PLAUSIBLE_PPM",
    "OUTPUT_SUFFIXES",
    "INFO_KEY",
    "checked_cases",
    "check_cases",
    "check_case",
    "check_output_dir",
    "path_problems",
    "output_problems",
    "inference_datalist",
    "output_paths",
    "file_stem",
    "output_stem",
    "as_bool",
    "as_float",
    "as_triplet",
    "is_null",
    "case_info",
    "source_filename",
    "require_configs",
]

logger = logging.getLogger(__name__)

#: What ``nonfinite`` may say about NaN/Inf voxels in the field: refuse the case, or zero them and leave them out
#: of the mask.
NONFINITE_POLICIES = ("error", "mask")

#: What the field is: ``local`` (background field removed: what the network was trained on) or ``total`` (the
#: unwrapped field before background removal; what the bundle does with it is up to the transforms).
FIELD_KINDS = ("local", "total")

#: Window (ppm) per field kind that the 99th percentile of |field| inside the mask (demeaned) must fall in to be
#: believed. Local fields of brains have a p99 of about 0.02–0.3 ppm (veins, deep grey nuclei, bleeds up to a few
#: tenths); the window ``[0.003, 1]`` leaves a margin of about 7× below and 3× above. A total field inside the brain
#: reaches several ppm near air–tissue interfaces (sinuses, ear canals: up to ~10 ppm) and is rarely below 0.1 ppm at
#: its p99; the window ``[0.03, 30]`` leaves a margin of 3× on either side. A value above the window usually means Hz
#: or radians given as ppm (or a wrong ``b0_tesla``/``echo_time``); one below, ppm given as Hz/rad, or tesla.
PLAUSIBLE_PPM = {"local": (3e-3, 1.0), "total": (0.03, 30.0)}

#: Typical p99 range (ppm) per field kind, used to suggest the likely unit of an implausible field.
TYPICAL_PPM = {"local": (0.01, 0.5), "total": (0.1, 10.0)}

#: Field strengths (T) and echo times (s) tried when suggesting the likely unit.
COMMON_B0_TESLA = (1.5, 3.0, 7.0)

#: Files written per case: ``{stem}{suffix}`` in ``output_dir``.
OUTPUT_SUFFIXES = {
    "chi": "_chi.nii.gz",
    "residual": "_residual.nii.gz",
    "preview": "_chi.png",
    "report": "_report.json",
}

#: An input whose B0-nearest voxel axis is within this angle of B0 is not rotated.
#: Largest difference (mm) between the field's and the mask's affines that is taken as "the same grid".
AFFINE_ATOL_MM = 1e-3

#: Key of the per-case record (a JSON string: survives collation) that the transforms fill and SaveReportd writes.
INFO_KEY = "qsm_info"


class InputError(ValueError):
    """A user input (file, setting or output location) that the bundle refuses, with a message naming it."""


# ---------------------------------------------------------------------------------------------------- settings


def is_null(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none"))


def as_bool(value, name: str = "flag") -> bool:
    """A boolean from a config/command-line value (``true``/``false`` arrive from the command line as strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
    raise InputError(f"{name} must be true or false, got {value!r}")


def as_float(value, name: str) -> float | None:
    if is_null(value):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise InputError(f"{name} must be finite, got {value!r}")
    return out


def as_triplet(value, name: str, positive: bool = False) -> tuple[float, float, float] | None:
    if is_null(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"{name} must be 3 numbers like [1, 1, 1] or null, got {value!r}") from None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 numbers like [1, 1, 1] or null, got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise InputError(f"{name} must be 3 finite numbers, got {value!r}")
    if positive and min(out) <= 0:
        raise InputError(f"{name} must be positive (mm), got {value!r}")
    if not positive and not any(out):
        raise InputError(f"{name} must not be the zero vector")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class FieldSettings:
    """How to read the fields: unit, field strength, echo time, what to do with NaN/Inf, whether to check values."""

    field_unit: str = "ppm"
    b0_tesla: float | None = None
    echo_time: float | None = None
    nonfinite: str = "error"
    check_values: bool = True
    field_kind: str = "local"

    @classmethod
    def parse(
        cls, field_unit="ppm", b0_tesla=None, echo_time=None, nonfinite="error", check_values=True, field_kind="local"
    ):
        """Validated settings from config/command-line values; raises :class:`InputError` listing every problem."""
        problems = []
        kind = str(field_kind).strip().lower()
        if kind not in FIELD_KINDS:
            problems.append(
                f"field_kind must be one of {', '.join(FIELD_KINDS)} (a background-removed local field, or the total "
                f"field before background removal), got {field_kind!r}"
            )
        unit = str(field_unit).strip().lower()
        if unit not in FIELD_UNITS:
            problems.append(f"field_unit must be one of {', '.join(FIELD_UNITS)}, got {field_unit!r}")
        b0 = te = None
        try:
            b0 = as_float(b0_tesla, "b0_tesla")
        except InputError as e:
            problems.append(str(e))
        try:
            te = as_float(echo_time, "echo_time")
        except InputError as e:
            problems.append(str(e))
        if unit in ("hz", "rad"):
            if b0 is None:
                problems.append(f"field_unit {unit!r} needs b0_tesla, the field strength in tesla (e.g. --b0_tesla 3)")
            elif not 0.05 <= b0 <= 25:
                problems.append(f"b0_tesla = {b0} T is not a field strength of an MRI scanner (0.05–25 T)")
        if unit == "rad":
            if te is None:
                problems.append("field_unit 'rad' needs echo_time in seconds (e.g. --echo_time 0.02)")
            elif te <= 0:
                problems.append(f"echo_time must be positive (seconds), got {te}")
            elif te > 1:
                problems.append(f"echo_time is in seconds: {te} looks like milliseconds (20 ms is 0.02)")
        policy = str(nonfinite).strip().lower()
        if policy not in NONFINITE_POLICIES:
            problems.append(f"nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {nonfinite!r}")
        try:
            check = as_bool(check_values, "check_values")
        except InputError as e:
            problems.append(str(e))
            check = True
        if problems:
            raise InputError("; ".join(problems))
        return cls(unit, b0, te, policy, check, kind)

    @property
    def ppm_per_unit(self) -> float:
        """Factor that turns a field in ``field_unit`` into ppm."""
        return float(convert_field(1.0, self.field_unit, "ppm", b0_tesla=self.b0_tesla, echo_time=self.echo_time))

    def describe(self) -> str:
        if self.field_unit == "ppm":
            return f"ppm, {self.field_kind} field"
        extra = f", B0 {self.b0_tesla:g} T" + (f", TE {self.echo_time:g} s" if self.field_unit == "rad" else "")
        return f"{self.field_unit}{extra}, {self.field_kind} field"


# ---------------------------------------------------------------------------------------------- per-case record


def case_info(d: dict) -> dict:
    """The per-case record (what was done to the input) kept as a JSON string under :data:`INFO_KEY`."""
    raw = d.get(INFO_KEY)
    return json.loads(raw) if isinstance(raw, str) and raw else {}


def source_filename(img) -> str:
    """The file a MetaTensor was read from (``"case"`` if unknown)."""
    return str(getattr(img, "meta", {}).get("filename_or_obj", "case"))


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


# ---------------------------------------------------------------------------------------------- case checks


def _open(path, role: str):
    """``(nibabel image, None)`` or ``(None, problem)``; reads the header only."""
    import nibabel as nib

    if not isinstance(path, str) or not path:
        return None, f"{role}: no file given ({path!r})"
    if not os.path.exists(path):
        return None, f"{path}: {role} file not found"
    if os.path.isdir(path):
        return None, f"{path}: {role} is a directory, not an image file"
    try:
        img = nib.load(path)
        _ = img.shape, img.affine
    except Exception as e:  # nibabel raises many types for damaged or foreign files
        return (
            None,
            f"{path}: cannot read the {role} ({type(e).__name__}: {e}); a NIfTI file (.nii, .nii.gz) is expected",
        )
    return img, None


def _spatial_shape(img, path: str, role: str) -> tuple[tuple[int, ...] | None, str | None]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 3:
        kind = np.dtype(img.get_data_dtype()).kind
        if kind not in "biuf":
            what = "complex" if kind == "c" else f"{img.get_data_dtype()}"
            return None, f"{path}: the {role} holds {what} values; a real-valued map is expected"
        return shape, None
    if len(shape) > 3 and role == "field":
        return None, (
            f"{path}: the field is {len(shape)}D, shape {tuple(img.shape)}: {int(np.prod(shape[3:]))} volumes, as in "
            "multi-echo or time-series data; this bundle reconstructs one 3D local field map: combine the echoes "
            "into one field (e.g. a weighted fit of the unwrapped phase over echo time), remove the background "
            "field, and pass that 3D map (with its field_unit)"
        )
    return None, f"{path}: the {role} has shape {tuple(img.shape)}; a 3D volume is expected"


def _read(img, path: str, role: str, shape: tuple[int, ...]) -> tuple[np.ndarray | None, str | None]:
    """The whole data array (float32), or the problem: a damaged or truncated file fails here."""
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as e:
        return None, (
            f"{path}: cannot read the {role} data ({type(e).__name__}: {e}); the file is damaged or truncated "
            "(copy it again)"
        )
    return data, None


#: The paths of a case and what they are.
ROLES = {"image": "field", "mask": "mask", "label": "label (true χ)"}


def path_problems(item: dict) -> list[str]:
    """Missing files and directories among a case's paths, without opening anything."""
    problems = []
    for key, role in ROLES.items():
        if key == "image" or item.get(key) is not None:
            path = item.get(key)
            if not isinstance(path, str) or not path:
                problems.append(f"{role}: no file given ({path!r})")
            elif not os.path.exists(path):
                problems.append(f"{path}: {role} file not found")
            elif os.path.isdir(path):
                problems.append(f"{path}: {role} is a directory, not an image file")
    return problems


def _unit_suggestions(native: float, settings: FieldSettings) -> list[str]:
    """Readings of a p99 of ``native`` (in the stated unit's number) that would be typical for the field kind."""
    lo, hi = TYPICAL_PPM[settings.field_kind]
    out = []
    if settings.field_unit != "ppm" and lo <= native <= hi:
        out.append(f"as ppm it would be {native:.3g} ppm: use --field_unit ppm")
    for b0 in COMMON_B0_TESLA:
        ppm = float(convert_field(native, "hz", "ppm", b0_tesla=b0))
        if lo <= ppm <= hi and not (settings.field_unit == "hz" and settings.b0_tesla == b0):
            out.append(f"in Hz at {b0:g} T it would be {ppm:.2g} ppm: use --field_unit hz --b0_tesla {b0:g}")
    if not out:  # radians at a typical echo time
        for b0 in COMMON_B0_TESLA:
            ppm = float(convert_field(native, "rad", "ppm", b0_tesla=b0, echo_time=0.02))
            if lo <= ppm <= hi:
                out.append(
                    f"in radians at TE 20 ms and {b0:g} T it would be {ppm:.2g} ppm: use --field_unit rad "
                    f"--echo_time <TE in s> --b0_tesla {b0:g}"
                )
    return out


def _value_problem(path: str, values_ppm: np.ndarray, settings: FieldSettings) -> str | None:
    """Is the field believable in the stated unit and kind? ``values_ppm``: the field in the mask, in ppm, demeaned.

    The 99th percentile of |field| must lie in :data:`PLAUSIBLE_PPM` of ``settings.field_kind``; the message names
    the readings (Hz at 1.5/3/7 T, ppm, radians) under which the values would be typical.
    """
    p99 = float(np.percentile(np.abs(values_ppm), 99))
    kind = settings.field_kind
    lo, hi = PLAUSIBLE_PPM[kind]
    if lo <= p99 <= hi:
        return None
    unit = settings.field_unit
    native = p99 / settings.ppm_per_unit
    seen = f"p99 |field| in the mask = {native:.3g} {unit}" + (f" = {p99:.3g} ppm" if unit != "ppm" else "")
    expected = f"expected {lo:g}–{hi:g} ppm for a {kind} field"
    what = "implausible" if p99 > hi else "implausibly small"
    hints = _unit_suggestions(native, settings)
    if p99 < lo and unit == "ppm":
        hints.append("is it in tesla or ppb? convert it to ppm")
    if unit == "hz" and settings.b0_tesla:
        hints.append(f"check b0_tesla ({settings.b0_tesla:g} T)")
    if unit == "rad" and settings.b0_tesla and settings.echo_time:
        hints.append(
            f"check echo_time ({settings.echo_time:g} s: seconds, not ms) and b0_tesla ({settings.b0_tesla:g} T), "
            "and that the phase is unwrapped"
        )
    if kind == "local" and p99 > hi:
        hints.append("if it is the total field (background not removed), say --field_kind total")
    hint = "; ".join(hints) if hints else "check field_unit, b0_tesla and echo_time"
    return (
        f"{path}: values {what} for a {kind} field in field_unit {unit!r}: {seen} ({expected}); {hint}; "
        "--check_values false skips this check"
    )


def check_case(item: dict, settings: FieldSettings) -> tuple[list[str], list[str]]:
    """Check one case (``image`` field, optional ``mask``, optional ``label``); returns (problems, warnings).

    Reads the volumes (one at a time, float32) but keeps nothing.
    """
    problems: list[str] = []
    warnings: list[str] = []
    fpath = item.get("image")
    fimg, problem = _open(fpath, "field")
    if problem:
        return [problem], warnings
    shape, problem = _spatial_shape(fimg, fpath, "field")
    if problem:
        return [problem], warnings
    field, problem = _read(fimg, fpath, "field", shape)
    if problem:
        return [problem], warnings
    bad = ~np.isfinite(field)
    n_bad = int(bad.sum())
    if n_bad:
        if settings.nonfinite == "error":
            problems.append(
                f"{fpath}: {n_bad} voxels are NaN or infinite; fix the field, or pass --nonfinite mask to set them to "
                "0 and leave them out of the mask"
            )
        else:
            warnings.append(f"{fpath}: {n_bad} NaN/Inf voxels are set to 0 and left out of the mask (nonfinite: mask)")
        field[bad] = 0
    inside = None
    mpath = item.get("mask")
    if mpath is not None:
        mimg, problem = _open(mpath, "mask")
        mshape = None
        if problem is None:
            mshape, problem = _spatial_shape(mimg, mpath, "mask")
        if problem is None and mshape != shape:
            problem = (
                f"{mpath}: mask shape {mshape} differs from the field's {shape} ({fpath}); the mask must be on the "
                "field's grid"
            )
        if problem is None:
            diff = float(np.max(np.abs(np.asarray(mimg.affine) - np.asarray(fimg.affine))))
            if diff > AFFINE_ATOL_MM:
                problem = (
                    f"{mpath}: mask affine differs from the field's ({fpath}) by up to {diff:.3g} (mm); the mask must "
                    "be on the field's grid (resample it, or fix its header)"
                )
        mask = None
        if problem is None:
            mask, problem = _read(mimg, mpath, "mask", shape)
        if problem is None and not np.all(np.isfinite(mask)):
            problem = f"{mpath}: the mask contains NaN or infinite values"
        if problem:
            problems.append(problem)
        else:
            inside = mask > 0
            del mask
            if not inside.any():
                problems.append(f"{mpath}: the mask is empty (no voxel > 0)")
                inside = None
            elif n_bad:
                inside &= ~bad
                if not inside.any():
                    problems.append(f"{mpath}: the mask covers only NaN/Inf voxels of the field ({fpath})")
                    inside = None
    else:
        inside = field != 0
        if not inside.any():
            problems.append(f"{fpath}: the field is zero everywhere and no mask was given: nothing to reconstruct")
            inside = None
    if inside is not None:
        values = field[inside] * np.float32(settings.ppm_per_unit)
        values -= np.float32(values.mean(dtype=np.float64))
        if not np.any(values):
            problems.append(f"{fpath}: the field is constant inside the mask: nothing to reconstruct")
        elif settings.check_values:
            problem = _value_problem(fpath, values, settings)
            if problem:
                problems.append(problem)
    lpath = item.get("label")
    if lpath is not None:
        role = "label (true χ)"
        limg, problem = _open(lpath, role)
        if problem is None:
            lshape, problem = _spatial_shape(limg, lpath, role)
            if problem is None and lshape != shape:
                problem = f"{lpath}: label shape {lshape} differs from the field's {shape} ({fpath})"
        if problem is None:  # read the data: a truncated or damaged file fails here, not inside LoadImaged
            label, problem = _read(limg, lpath, role, shape)
            if problem is None and not np.all(np.isfinite(label)):
                problem = f"{lpath}: the {role} contains NaN or infinite values"
            del label
        if problem:
            problems.append(problem)
    return problems, warnings


# ---------------------------------------------------------------------------------------------- output checks


def output_paths(output_dir: str, stem: str) -> dict[str, str]:
    """The files written for one case: ``{"chi", "residual", "preview", "report"}`` → path."""
    return {key: os.path.join(output_dir, stem + suffix) for key, suffix in OUTPUT_SUFFIXES.items()}


def check_output_dir(output_dir: str) -> tuple[str | None, list[str]]:
    """Create ``output_dir`` if needed and check that a file can be created in it.

    Returns ``(problem or None, directories created)``; on a problem nothing created is left behind.
    """
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"output directory {output_dir}: exists and is not a directory", []
    missing, parent = [], path
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    created: list[str] = []
    try:
        for folder in reversed(missing):
            os.mkdir(folder)
            created.append(folder)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        remove_empty_dirs(created)
        return f"output directory {output_dir} is not writable ({e.strerror or e})", []
    return None, created


def remove_empty_dirs(folders: Sequence[str]) -> None:
    """Remove the given directories, deepest first, where they are (still) empty."""
    for folder in sorted(folders, key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def output_problems(items: Sequence[dict], output_dir: str, overwrite: bool = False) -> list[str]:
    """Outputs that exist already (unless ``overwrite``) and inputs that would write the same files."""
    problems: list[str] = []
    stems: dict[str, str] = {}
    for item in items:
        source = str(item.get("image"))
        stem = file_stem(source)
        if stem in stems:
            problems.append(
                f"{source} is listed twice"
                if stems[stem] == source
                else f"{source} and {stems[stem]} would both write {stem}{OUTPUT_SUFFIXES['chi']}: give the inputs "
                "different names"
            )
            continue
        stems[stem] = source
        if not overwrite:
            existing = [p for p in output_paths(output_dir, stem).values() if os.path.lexists(p)]
            if existing:
                problems.append(
                    f"{source}: output {', '.join(existing)} already exists; pass --overwrite true to replace it"
                )
    return problems


def check_cases(
    items: Sequence[dict], settings: FieldSettings, output_dir: str, overwrite: bool = False
) -> tuple[list[str], list[str], list[str]]:
    """Check every case (reading its volumes) and where its outputs go; returns (problems, warnings, dirs created)."""
    problems: list[str] = []
    warnings: list[str] = []
    for item in items:
        p, w = check_case(item, settings)
        problems += p
        warnings += w
    problem, created = check_output_dir(output_dir)
    if problem:
        problems.append(problem)
    problems += output_problems(items, output_dir, overwrite)
    return problems, warnings, created


def inference_datalist(
    field: str | None = None,
    mask: str | None = None,
    datalist: str | None = None,
    demo: Callable[[], dict[str, str]] | None = None,
) -> list[dict[str, str]]:
    """The list of cases to reconstruct.

    Arguments:
        field: one local field NIfTI (ppm unless ``field_unit`` says otherwise).
        mask: its brain mask NIfTI (optional; without it the mask is where the field is non-zero).
        datalist: a MONAI datalist JSON; its ``testing`` items (else ``validation``, else ``training``) with
            ``image`` (field), optional ``mask`` and optional ``label`` (true χ, reported against).
        demo: called for the one case when neither ``field`` nor ``datalist`` is given (``inference.json``:
            :class:`scripts.demo.DemoCase`, which simulates it).
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
    if demo is None:
        raise ValueError("no input: give --field (one case) or --datalist (many cases)")
    return [demo()]


def checked_cases(
    *,
    field: str | None = None,
    mask: str | None = None,
    datalist: str | None = None,
    output_dir: str,
    demo: Callable[[], dict[str, str]] | None = None,
    field_unit: str = "ppm",
    field_kind: str = "local",
    b0_tesla: float | None = None,
    echo_time: float | None = None,
    nonfinite: str = "error",
    check_values: bool = True,
    voxel_size: Sequence[float] | None = (1.0, 1.0, 1.0),
    b0_direction: Sequence[float] | None = None,
    dc_weight: float | None,
    overwrite: bool = False,
    weights_check: Callable[[], None] | None = None,
) -> list[dict[str, str]]:
    """The cases to reconstruct (:func:`inference_datalist`; ``demo`` when no input is given), every one checked.

    Nothing is written before every check has passed. In two stages, each reporting every problem it finds:

    1. without reading any volume: the settings, the datalist, that every ``image``/``mask``/``label`` path exists,
       the output directory (created if needed and probed) and existing outputs / clashing output names (for the
       demo, the files it would write, before it writes its input into ``output_dir/demo_input``);
    2. only if stage 1 found nothing: every volume is opened and its data read (field, mask and label), and the
       field's values are checked against its unit and kind.

    With any problem the run stops (``SystemExit``: a non-zero exit status) with a message listing each problem and
    the file it concerns; an output directory created for the check is removed again. Warnings (NaN/Inf left out of
    the mask with ``nonfinite: "mask"``) are logged.

    ``weights_check`` (the config's :class:`~scripts.engines.GeneratorMatchesWeights`) is
    part of stage 1: weights that do not fit the generator (a missing file, other shapes, a sidecar with other
    settings) stop the run before the demo writes its input, as any other problem does.
    """
    problems: list[str] = []
    settings = None
    try:
        settings = FieldSettings.parse(field_unit, b0_tesla, echo_time, nonfinite, check_values, field_kind)
    except InputError as e:
        problems.append(str(e))
    for name, value, positive in (("voxel_size", voxel_size, True), ("b0_direction", b0_direction, False)):
        try:
            as_triplet(value, name, positive)
        except InputError as e:
            problems.append(str(e))
    try:
        weight = as_float(dc_weight, "dc_weight")
        if weight is not None and weight <= 0:
            problems.append(f"dc_weight must be > 0 (null switches the refinement off), got {dc_weight!r}")
    except InputError as e:
        problems.append(str(e))
    try:
        overwrite = as_bool(overwrite, "overwrite")
    except InputError as e:
        problems.append(str(e))
        overwrite = False
    use_demo = is_null(field) and is_null(datalist) and demo is not None
    items: list[dict] = []
    planned: list[dict] = []
    if use_demo:  # the files the demo would write, without writing them
        plan = getattr(demo, "planned", None)
        planned = [plan()] if callable(plan) else []
    else:
        try:
            items = inference_datalist(
                None if is_null(field) else field,
                None if is_null(mask) else mask,
                None if is_null(datalist) else datalist,
            )
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            where = datalist if not is_null(datalist) else field
            problems.append(f"{where}: {e}" if where is not None else str(e))
    for item in items:
        problems += path_problems(item)
    problem, created = check_output_dir(output_dir)
    if problem:
        problems.append(problem)
    problems += output_problems(items or planned, output_dir, overwrite)
    if weights_check is not None:
        try:
            weights_check()
        except (OSError, ValueError) as e:
            problems.append(str(e))
    warnings: list[str] = []
    if not problems:  # stage 2: read every volume
        if use_demo:
            items = [demo()]  # type: ignore[misc]
        for item in items:
            p, w = check_case(item, settings)  # type: ignore[arg-type]
            problems += p
            warnings += w
    if problems:
        remove_empty_dirs(created)
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SystemExit(
            f"QSM inference stopped before writing anything: {len(problems)} problem(s) with the input:\n{lines}"
        )
    for warning in warnings:
        logger.warning(warning)
    logger.info(f"{len(items)} case(s) checked: field unit {settings.describe()}, outputs to {output_dir}")
    return items


def require_configs(merged: Sequence[str], *needed: str) -> None:
    """Stop with a message naming the config files a config needs when they were not merged before it.

    Each config file adds its name to the list ``merged_configs`` (``train.json`` and ``inference.json`` set it,
    ``train_gan.json`` and ``evaluate.json`` append with ``+merged_configs``), so a config run without the one it
    extends fails here, before anything else, with the command that works instead of a ``KeyError`` on the first
    missing id.

    Arguments:
        merged: the merged config's ``merged_configs``.
        needed: file names that must be in it, e.g. ``"inference.json"``.
    """
    missing = [name for name in needed if name not in merged]
    if missing:
        files = ",".join(f"'configs/{name}'" for name in [*missing, *merged])
        raise SystemExit(
            f"{', '.join(merged)} extends {', '.join(missing)}: merge it after that config, e.g. "
            f'--config_file "[{files}]"'
        )
