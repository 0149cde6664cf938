"""QSM metrics as the QSM community scores them, standalone and as Ignite metrics.

The definitions follow the QSM-CI scorer (``qsm_ci/qsm_eval.py`` of the ``qsm-ci`` package, itself a port of the
QSM.rs reference metrics and of the QSM challenge 2.0 evaluation); ``tests/test_metrics.py`` checks them against it.

Every standalone function takes (X, Y, Z) volumes — torch tensors or numpy arrays, leading singleton dimensions
such as a channel are dropped — and returns a Python float (ppm for χ, percent for the NRMSE family). As in QSM-CI,
both maps are first set to 0 outside ``mask > 0`` and a non-finite predicted voxel counts as 0 (a method that drops
or fails on a voxel is scored as 0 against the truth there). All arithmetic is float64.

Definitions (r = prediction, t = truth, both zeroed outside the mask M; ``x̃`` = x demeaned inside M):

* :func:`nrmse` (%) = 100·‖r̃ − t̃‖/‖t̃‖ over M (QSM challenge 2.0, QSM-CI).
* :func:`nrmse_2016` (%) = 100·‖r − t‖/‖t‖ over M, no demeaning (2016 reconstruction challenge).
* :func:`nrmse_detrended` (%): least-squares fit r̃ = s·t̃ + c, r̃ corrected to (r̃ − c)/s, then NRMSE; equals NRMSE
  when |s| < 1e-30 (QSM-CI).
* :func:`hfen` (%) = 100·‖LoG(r) − LoG(t)‖/‖LoG(t)‖ over M, LoG = ``scipy.ndimage.gaussian_laplace`` with σ = 1.5
  voxels, ``truncate=5`` (a 17-voxel kernel) and scipy's default ``reflect`` boundary, filtering the whole
  (zeroed) volume (QSM-CI).
* :func:`xsim`: SSIM on raw ppm with 5×5×5 uniform windows truncated at the volume border (out-of-volume voxels
  absent, not zero), L = 1, K1 = 0.01, K2 = 0.001, averaged over the voxels of M whose SSIM denominator is > 0
  (QSM-CI; 0 if there are none).
* :func:`ssim`: QSM-CI has none; here the same computation with the usual SSIM constants K1 = 0.01, K2 = 0.03
  and L = the range (max − min) of the truth inside M (1 if that range is 0).
* :func:`psnr` (dB): QSM-CI has none; here 20·log10(L / RMSE), RMSE = sqrt(mean over M of (r̃ − t̃)²) on the
  demeaned maps (like NRMSE, blind to the arbitrary χ offset), L = range of the truth inside M; +inf when r̃ = t̃.
* :func:`pearson`: Pearson correlation of r and t over M (0 when undefined, as QSM-CI).
* :func:`dgm_linearity` = |1 − s|, s the least-squares slope of the reconstructed against the true regional means
  over the label ids present (default 1–6: caudate, globus pallidus, putamen, red nucleus, dentate, substantia
  nigra); NaN with fewer than two regions (QSM-CI).
* :func:`calcification_moment` / :func:`calcification_streaking`: QSM-CI's calcification metrics on the voxels
  labelled 16 (all of them taken as one calcification): the true moment is (voxel count × mean χ); the
  reconstructed calcification is the set of voxels, in the label's bounding box grown by 3 voxels, below the least
  negative threshold t ∈ {0, −0.01, …, −3.5} ppm that no voxel of the surrounding shell (box grown by a further
  8 voxels) falls below; moment deviation = |true moment − count × mean of that set| (ppm·voxels); streaking =
  standard deviation of the residuals of the linear fit of reconstructed on true χ in the rim (box grown by 3 + 4
  voxels, minus the inner box) ÷ |mean χ of the reconstructed calcification|.
* :func:`lesion_total_susceptibility`: per lesion, Σχ·(voxel volume) in ppm·mm³ for prediction and truth and the
  signed relative error (pred − true)/true (negative: magnitude under-estimated, for para- and diamagnetic lesions
  alike).

:func:`tile_seam_ratio` is not a QSM-CI metric: it measures seams of tiled inference, the mean |gradient| across
the planes at tile borders over that across the planes 2–6 voxels from them, inside the mask (1: no seam).

Work that depends on the truth alone (its LoG for HFEN, its window sums for XSIM/SSIM) is computed once per truth
and mask and reused while several maps are scored against them (the demo's report: network, refinement, TKD; the
evaluation: every method of a case): :func:`_truth_cached` keys it by the arrays' contents. HFEN uses the LoG's
linearity, LoG(r) − LoG(t) = LoG(r − t): one filtering of the difference per map.

:func:`compute_all` returns all of them (plus QSM-CI's region NRMSEs when a label map is given) as one dict.
:class:`QSMMetric` is the Ignite metric for MONAI evaluators; :func:`higher_is_better` tells the direction.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from scipy import ndimage
from scipy.ndimage import binary_dilation, gaussian_laplace, uniform_filter

from .physics import mask_box

__all__ = [
    "nrmse",
    "nrmse_2016",
    "nrmse_detrended",
    "hfen",
    "xsim",
    "ssim",
    "psnr",
    "pearson",
    "dgm_linearity",
    "calcification_metrics",
    "calcification_moment",
    "calcification_streaking",
    "lesion_total_susceptibility",
    "tile_seam_ratio",
    "compute_all",
    "prepare_case",
    "metric_of",
    "PreparedCase",
    "higher_is_better",
    "QSMMetric",
    "CASE_METRICS",
    "DGM_LABEL_IDS",
    "CALCIFICATION_LABEL_ID",
    "LESION_LABEL_IDS",
    "MICROBLEED_LABEL_ID",
]

#: Deep-grey-matter label ids of the QSM challenge 2.0 phantom (and of ``scripts.phantoms.brain``).
DGM_LABEL_IDS = (1, 2, 3, 4, 5, 6)
#: Label id of calcifications.
CALCIFICATION_LABEL_ID = 16
#: Lesion label ids of ``scripts.phantoms.brain``: calcification, microbleed, haemorrhage, tumour-like lesion.
LESION_LABEL_IDS = (16, 17, 18, 19)
#: Label id of cerebral microbleeds.
MICROBLEED_LABEL_ID = 17
#: Tissue (thalamus, white and grey matter), blood and DGM label ids of QSM-CI's region NRMSEs.
_TISSUE_IDS, _BLOOD_ID = (7, 8, 9), 11

HFEN_SIGMA, HFEN_TRUNCATE = 1.5, 5.0
SSIM_WINDOW = 5


# ---------------------------------------------------------------------------------------------------------------
# input handling


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor
            x = x.as_tensor()
        if x.is_complex():
            raise ValueError(f"{name} must be real-valued, got a complex tensor")
        return x.cpu().to(torch.float64).numpy() if x.is_floating_point() else x.cpu().numpy()
    x = np.asarray(x)
    if np.iscomplexobj(x):
        raise ValueError(f"{name} must be real-valued, got a complex array")
    return x


def _volume(x: Any, name: str) -> np.ndarray:
    """``x`` as a 3-D numpy array, dropping leading singleton dimensions (channel, batch)."""
    arr = _to_numpy(x, name)
    original = arr.shape
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{name} must be a 3-D volume (X, Y, Z), leading singleton dims allowed; got shape {original}")
    return arr


def _check_shapes(**volumes: np.ndarray) -> None:
    shapes = {k: v.shape for k, v in volumes.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError("shape mismatch: " + ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()))


def _prepare(pred: Any, truth: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r, t, m): float64 prediction and truth set to 0 outside the boolean mask ``m`` (non-finite r → 0)."""
    r, t, m = _volume(pred, "pred"), _volume(truth, "truth"), _volume(mask, "mask")
    _check_shapes(pred=r, truth=t, mask=m)
    m = np.nan_to_num(m.astype(np.float64)) > 0
    if not m.any():
        raise ValueError("empty mask: no voxel has mask > 0")
    r, t = r.astype(np.float64), t.astype(np.float64)
    if not np.isfinite(t[m]).all():
        raise ValueError("truth has non-finite values (NaN/inf) inside the mask")
    r = np.where(m & np.isfinite(r), r, 0.0)
    t = np.where(m, t, 0.0)
    return r, t, m


def _labels(labels: Any, shape: tuple[int, ...]) -> np.ndarray:
    seg = _volume(labels, "labels")
    _check_shapes(volumes=np.empty(shape, bool), labels=seg)
    seg = np.asarray(seg, dtype=np.float64)
    if not np.isfinite(seg).all():
        raise ValueError("labels has non-finite values")
    return np.rint(seg).astype(np.int64)


def _full_mask(x: Any) -> np.ndarray:
    return np.ones(_volume(x, "pred").shape, bool)


# ---------------------------------------------------------------------------------------------------------------
# kernels on prepared arrays (r, t zeroed outside the boolean mask m)


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares y = slope·x + intercept (QSM-CI/QSM.rs ``linear_fit``; (0, 0) when degenerate)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.size
    sum_x, sum_y = x.sum(), y.sum()
    denom = n * (x * x).sum() - sum_x * sum_x
    if abs(denom) < 1e-30:
        return 0.0, 0.0
    slope = (n * (x * y).sum() - sum_x * sum_y) / denom
    return float(slope), float((sum_y - slope * sum_x) / n)


def _nrmse_pair(r: np.ndarray, t: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """(demeaned NRMSE %, detrended NRMSE %) over ``m``; NaN when ``m`` is empty or the truth constant there."""
    if not m.any():
        return math.nan, math.nan
    recon = r[m] - r[m].mean()
    truth = t[m] - t[m].mean()
    norm_truth = math.sqrt(float((truth * truth).sum()))
    if norm_truth < 1e-30:
        return math.nan, math.nan
    value = 100.0 * math.sqrt(float(((recon - truth) ** 2).sum())) / norm_truth
    slope, intercept = _linear_fit(truth, recon)
    if abs(slope) < 1e-30:
        return value, value
    corrected = (recon - intercept) / slope
    return value, 100.0 * math.sqrt(float(((corrected - truth) ** 2).sum())) / norm_truth


def _nrmse_2016(r, t, m) -> float:
    norm_truth = math.sqrt(float((t[m] ** 2).sum()))
    if norm_truth < 1e-30:
        return math.nan
    return 100.0 * math.sqrt(float(((r[m] - t[m]) ** 2).sum())) / norm_truth


_TRUTH_CACHE: OrderedDict = OrderedDict()
_TRUTH_CACHE_SIZE = 8
_TRUTH_CACHE_LOCK = threading.Lock()


def _truth_cached(kind: str, arrays: Sequence[np.ndarray], compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered for the next call with equal ``arrays`` (by content: shape, dtype and a BLAKE2
    digest of the bytes: about 50 ms for the truth and mask of a brain's box against 0.3 s for the truth's window sums
    and 0.75 s for its LoG, one thread, in a one-off profile) and the same ``kind`` (which names the computation and
    its parameters). The last :data:`_TRUTH_CACHE_SIZE` results are kept. Thread-safe: one lock around lookup and
    computation, so concurrent calls with the same key compute once (callers all score against one truth, so they
    would wait for each other's truth filtering anyway)."""
    digest = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.shape}{a.dtype.str}".encode())
        digest.update(a.view(np.uint8).reshape(-1))
    key = (kind, digest.hexdigest())
    with _TRUTH_CACHE_LOCK:  # threads scoring maps against one truth (CaseReport) wait for its first computation
        if key in _TRUTH_CACHE:
            _TRUTH_CACHE.move_to_end(key)
            return _TRUTH_CACHE[key]
        value = compute()
        _TRUTH_CACHE[key] = value
        while len(_TRUTH_CACHE) > _TRUTH_CACHE_SIZE:
            _TRUTH_CACHE.popitem(last=False)
    return value


def _log(x: np.ndarray) -> np.ndarray:
    return gaussian_laplace(x, sigma=HFEN_SIGMA, truncate=HFEN_TRUNCATE)


# A filter of radius ≤ margin gives the same values on the mask inside the mask's box grown by the margin (clipped to
# the volume) as on the whole volume: its support never reaches a face of the box that is not a face of the volume,
# and the volume's own faces (and their boundary modes) are kept.


def _hfen(r, t, m, crop: bool = True) -> float:
    if crop and m.any():  # only the mask's values count: filter its box (radius int(truncate·σ + 0.5))
        box = mask_box(m, int(HFEN_TRUNCATE * HFEN_SIGMA + 0.5))
        r, t, m = r[box], t[box], m[box]
    lt = _truth_cached("hfen", (t, m), lambda: _log(t)[m])
    denom = math.sqrt(float((lt**2).sum()))
    if denom < 1e-30:
        return math.nan
    value = 100.0 * math.sqrt(float((_log(r - t)[m] ** 2).sum())) / denom  # LoG(r) − LoG(t) = LoG(r − t)
    return value if math.isfinite(value) else math.nan


def _ssim(
    a, b, m, k1: float, k2: float, dynamic_range: float, window: int = SSIM_WINDOW, crop: bool = True
) -> float:
    """Mean over ``m`` of the SSIM map with ``window``³ uniform windows truncated at the border (QSM-CI's XSIM).
    ``crop``: computed on the mask's box grown by the window's half width (the same values, far less work)."""
    if crop and m.any():
        box = mask_box(m, window // 2)
        a, b, m = a[box], b[box], m[box]
    c1, c2 = (k1 * dynamic_range) ** 2, (k2 * dynamic_range) ** 2
    volume = float(window**3)

    def wsum(x):  # sum over the in-volume part of the window
        return uniform_filter(x, size=window, mode="constant", cval=0.0) * volume

    def truth_moments():  # the window count and b's mean and variance: the same for every map scored against b
        count = wsum(np.ones_like(b))
        count[count == 0] = 1.0
        mu_b = wsum(b) / count
        return count, mu_b, wsum(b * b) / count - mu_b * mu_b

    count, mu_b, var_b = _truth_cached(f"ssim{window}", (b, m), truth_moments)
    mu_a = wsum(a) / count
    var_a = wsum(a * a) / count - mu_a * mu_a
    cov = wsum(a * b) / count - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    valid = m & (den > 0.0)
    if not valid.any():
        return 0.0
    return float(np.mean(num[valid] / den[valid]))


def _truth_range(t, m) -> float:
    span = float(t[m].max() - t[m].min())
    return span if span > 0 else 1.0


def _xsim(r, t, m) -> float:
    return _ssim(r, t, m, 0.01, 0.001, 1.0)


def _ssim_standard(r, t, m) -> float:
    return _ssim(r, t, m, 0.01, 0.03, _truth_range(t, m))


def _psnr(r, t, m) -> float:
    diff = (r[m] - r[m].mean()) - (t[m] - t[m].mean())
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return math.inf
    return 20.0 * math.log10(_truth_range(t, m)) - 10.0 * math.log10(mse)


def _pearson(r, t, m) -> float:
    a, b = r[m] - r[m].mean(), t[m] - t[m].mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0.0 else 0.0


def _dgm_linearity(r, t, seg, label_ids) -> float:
    true_means, recon_means = [], []
    for label in label_ids:
        sel = seg == label
        if sel.any():
            true_means.append(t[sel].mean())
            recon_means.append(r[sel].mean())
    if len(true_means) < 2:
        return math.nan
    slope, _ = _linear_fit(np.array(true_means), np.array(recon_means))
    return abs(1.0 - slope)


def _box(shape, ranges) -> np.ndarray:
    out = np.zeros(shape, bool)
    out[tuple(slice(lo, hi) for lo, hi in ranges)] = True
    return out


def _calcification(r, t, seg, label_id) -> tuple[float, float]:
    """(moment deviation, streaking) of QSM-CI's ``calcification_metrics``; (NaN, NaN) without the label."""
    calc = seg == label_id
    if not calc.any():
        return math.nan, math.nan
    true_values = t[calc]
    true_moment = true_values.size * true_values.mean()
    shape = seg.shape
    idx = np.nonzero(calc)
    cube = [(max(int(i.min()) - 3, 0), min(int(i.max()) + 3 + 1, n)) for i, n in zip(idx, shape)]
    rim = [(max(lo - 4, 0), min(hi + 4, n)) for (lo, hi), n in zip(cube, shape)]
    outer = [(max(lo - 4, 0), min(hi + 4, n)) for (lo, hi), n in zip(rim, shape)]
    cube_m, rim_box_m, outer_m = _box(shape, cube), _box(shape, rim), _box(shape, outer)
    no_cube_m = outer_m & ~cube_m
    rim_m = no_cube_m & rim_box_m
    inside, around = r[cube_m], r[no_cube_m]
    # least negative threshold in {0, -0.01, ..., -3.5} that no voxel around the calcification falls below
    threshold = -3.5
    for i in range(351):
        candidate = -i * 0.01
        if int(np.count_nonzero(around < candidate)) == 0:
            threshold = candidate
            break
    segmented = inside[inside < threshold]
    if segmented.size == 0:
        return abs(float(true_moment)), math.nan
    calc_mean = float(segmented.mean())
    moment_dev = abs(float(true_moment) - segmented.size * calc_mean)
    rim_recon, rim_truth = r[rim_m], t[rim_m]
    if rim_recon.size < 2:
        return moment_dev, math.nan
    slope, intercept = _linear_fit(rim_truth, rim_recon)
    residuals = rim_recon - (slope * rim_truth + intercept)
    spread = float(np.sqrt(((residuals - residuals.mean()) ** 2).mean()))
    return moment_dev, (spread / abs(calc_mean) if abs(calc_mean) > 1e-30 else math.nan)


def _region_nrmses(r, t, m, seg) -> dict[str, float]:
    """QSM-CI's detrended NRMSEs over tissue (7, 8, 9), dilated blood (11) and DGM (1–6)."""
    blood = binary_dilation(m & (seg == _BLOOD_ID), structure=np.ones((3, 3, 3), bool))
    return {
        "nrmse_tissue": _nrmse_pair(r, t, m & np.isin(seg, _TISSUE_IDS))[1],
        "nrmse_blood": _nrmse_pair(r, t, blood)[1],
        "nrmse_dgm": _nrmse_pair(r, t, m & np.isin(seg, DGM_LABEL_IDS))[1],
    }


def _lesion_totals(r, t, seg, voxel_volume, label_ids, connected, dilation=0, tissue=None) -> list[dict[str, float]]:
    """Per-lesion totals (see :func:`lesion_total_susceptibility`); with a ``tissue`` label map also each lesion's
    ``tissue_label``, the most common tissue label of its voxels (its type, for an instance map)."""
    if label_ids is None:
        values = [int(v) for v in np.unique(seg) if v != 0]
    else:
        values = [int(v) for v in label_ids]
    regions = []
    for value in values:
        sel = seg == value
        if not sel.any():
            continue
        if connected:
            components, n = ndimage.label(sel, structure=np.ones((3, 3, 3), bool))
            regions += [(value, components == k) for k in range(1, n + 1)]
        else:
            regions.append((value, sel))
    out = []
    for number, (value, sel) in enumerate(regions, start=1):
        kind = {}
        if tissue is not None:
            labels, counts = np.unique(tissue[sel], return_counts=True)
            kind = {"tissue_label": int(labels[np.argmax(counts)])}
        if dilation > 0:
            sel = binary_dilation(sel, structure=np.ones((3, 3, 3), bool), iterations=int(dilation))
        truth_total = float(t[sel].sum()) * voxel_volume
        pred_total = float(r[sel].sum()) * voxel_volume
        out.append(
            {
                "lesion": number,
                "label": value,
                "voxels": int(sel.sum()),
                "volume_mm3": float(sel.sum()) * voxel_volume,
                "truth_total_ppm_mm3": truth_total,
                "pred_total_ppm_mm3": pred_total,
                "relative_error": (pred_total - truth_total) / truth_total if truth_total != 0.0 else math.nan,
                **kind,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# standalone metrics


def nrmse(pred, truth, mask) -> float:
    """NRMSE (%) of the QSM challenge 2.0 / QSM-CI: 100·‖r̃ − t̃‖/‖t̃‖ over the mask, r̃, t̃ demeaned in the mask."""
    return _nrmse_pair(*_prepare(pred, truth, mask))[0]


def nrmse_2016(pred, truth, mask) -> float:
    """NRMSE (%) of the 2016 reconstruction challenge: 100·‖r − t‖/‖t‖ over the mask, without demeaning."""
    return _nrmse_2016(*_prepare(pred, truth, mask))


def nrmse_detrended(pred, truth, mask) -> float:
    """Detrended NRMSE (%): r̃ corrected by the least-squares line r̃ ≈ s·t̃ + c to (r̃ − c)/s, then NRMSE."""
    return _nrmse_pair(*_prepare(pred, truth, mask))[1]


def hfen(pred, truth, mask) -> float:
    """HFEN (%): 100·‖LoG(r) − LoG(t)‖/‖LoG(t)‖ over the mask, LoG σ = 1.5 voxels, truncate 5 (QSM-CI)."""
    return _hfen(*_prepare(pred, truth, mask))


def xsim(pred, truth, mask) -> float:
    """XSIM: SSIM on raw ppm, 5³ uniform windows, L = 1, K1 = 0.01, K2 = 0.001, mean over the mask (QSM-CI)."""
    return _xsim(*_prepare(pred, truth, mask))


def ssim(pred, truth, mask) -> float:
    """SSIM with XSIM's windows but K1 = 0.01, K2 = 0.03 and L = the truth's range in the mask (not in QSM-CI)."""
    return _ssim_standard(*_prepare(pred, truth, mask))


def psnr(pred, truth, mask) -> float:
    """PSNR (dB) = 20·log10(L/RMSE), demeaned maps, RMSE over the mask, L = truth's range there (not in QSM-CI)."""
    return _psnr(*_prepare(pred, truth, mask))


def pearson(pred, truth, mask) -> float:
    """Pearson correlation of prediction and truth over the mask (QSM-CI ``correlation``; 0 when undefined)."""
    return _pearson(*_prepare(pred, truth, mask))


def dgm_linearity(pred, truth, labels, label_ids: Sequence[int] = DGM_LABEL_IDS, mask=None) -> float:
    """|1 − slope| of the reconstructed vs true mean χ over the regions ``label_ids`` (NaN with < 2 present).

    ``mask`` (optional) sets both maps to 0 outside it first, as QSM-CI's scorer does.
    """
    r, t, m = _prepare(pred, truth, _full_mask(pred) if mask is None else mask)
    return _dgm_linearity(r, t, _labels(labels, m.shape), tuple(label_ids))


def calcification_metrics(
    pred, truth, labels, mask=None, label_id: int = CALCIFICATION_LABEL_ID
) -> tuple[float, float]:
    """(moment deviation in ppm·voxels, streaking) around the voxels labelled ``label_id`` (QSM-CI)."""
    r, t, m = _prepare(pred, truth, _full_mask(pred) if mask is None else mask)
    return _calcification(r, t, _labels(labels, m.shape), int(label_id))


def calcification_moment(pred, truth, labels, mask=None, label_id: int = CALCIFICATION_LABEL_ID) -> float:
    """|true − reconstructed| calcification moment (voxel count × mean χ, ppm·voxels); NaN without the label."""
    return calcification_metrics(pred, truth, labels, mask, label_id)[0]


def calcification_streaking(pred, truth, labels, mask=None, label_id: int = CALCIFICATION_LABEL_ID) -> float:
    """Std of the residuals of recon vs truth in a rim around the calcification ÷ |recon calcification mean χ|."""
    return calcification_metrics(pred, truth, labels, mask, label_id)[1]


def lesion_total_susceptibility(
    pred,
    truth,
    labels,
    voxel_volume_mm3: float = 1.0,
    label_ids: Sequence[int] | None = None,
    connected_components: bool | None = None,
    mask=None,
    dilation_voxels: int = 0,
) -> list[dict[str, float]]:
    """Total susceptibility Σχ·voxel volume (ppm·mm³) of every lesion, for prediction and truth.

    Arguments:
        labels: integer map. With ``label_ids=None`` it is a lesion instance map (``lesion_ids`` of the phantom):
            every distinct non-zero value is one lesion. Otherwise the voxels whose value is in ``label_ids``
            are lesions (e.g. a tissue label map with :data:`LESION_LABEL_IDS`).
        voxel_volume_mm3: volume of one voxel.
        connected_components: split every label value into its 26-connected components, each one lesion
            (default: True when ``label_ids`` is given, False for an instance map).
        mask: optional; both maps are set to 0 outside it first.
        dilation_voxels: grow every lesion by this many voxels (26-connected) before summing, so that χ a
            reconstruction smears just outside the lesion still counts (both sums then include the surrounding
            tissue; grown lesions may overlap). ``voxels`` and ``volume_mm3`` are those of the grown region.

    Returns:
        one dict per lesion, in label order: ``lesion`` (1-based number), ``label``, ``voxels``, ``volume_mm3``,
        ``truth_total_ppm_mm3``, ``pred_total_ppm_mm3`` and ``relative_error`` = (pred − true)/true (signed
        fraction; negative = magnitude under-estimated; NaN when the true total is 0). Empty without lesions.
    """
    voxel_volume_mm3 = float(voxel_volume_mm3)
    if not (voxel_volume_mm3 > 0 and math.isfinite(voxel_volume_mm3)):
        raise ValueError(f"voxel_volume_mm3 must be a positive number, got {voxel_volume_mm3}")
    r, t, m = _prepare(pred, truth, _full_mask(pred) if mask is None else mask)
    seg = _labels(labels, m.shape)
    if connected_components is None:
        connected_components = label_ids is not None
    if int(dilation_voxels) != dilation_voxels or dilation_voxels < 0:
        raise ValueError(f"dilation_voxels must be a non-negative integer, got {dilation_voxels!r}")
    return _lesion_totals(r, t, seg, voxel_volume_mm3, label_ids, bool(connected_components), int(dilation_voxels))


def tile_seam_ratio(
    chi: Any,
    mask: Any = None,
    tile: int = 48,
    offset: int | Sequence[int] = 0,
    near: tuple[int, int] = (2, 6),
) -> dict[str, float]:
    """How much more χ changes across tile borders than across the planes near them: a seam detector.

    Plane ``p`` of an axis is the interface between voxels ``p − 1`` and ``p``; its gradient is ``|χ[p] − χ[p−1]|``
    at the voxel pairs whose two voxels are both inside ``mask``. The tile borders are the planes ``p = o + k·tile``
    (``o`` in ``offset``, any integer ``k``) with ``0 < p < n`` (the volume's own faces are not borders); their
    neighbours are the other planes ``near[0]``–``near[1]`` planes away from the nearest border (both sides).
    The ratio is (mean gradient over the border planes) / (mean gradient over the neighbour planes): about 1 for a
    seamless map, above 1 where tiles meet with a step or a kink. Apply it to an error map (χ − truth) to see the
    seams without the anatomy.

    For :class:`scripts.inference.CropSlidingWindowInferer` with ``placement="grid"`` (``"fit"`` shifts the tiles by
    an offset per axis: ``fit_window_starts``) the output tiles start at its ``window_starts`` in the
    unpadded volume (multiples of its ``stride``; the zero-padding by ``margin`` does not shift them): exact stride
    48 → ``tile=48, offset=0``; with overlap the faces are at ``k·stride`` and ``k·stride + tile`` →
    ``tile=stride, offset=(0, tile % stride)`` (:meth:`~scripts.inference.CropSlidingWindowInferer.tile_faces`).

    Arguments:
        chi: (X, Y, Z) volume (leading singleton dimensions dropped), torch or numpy.
        mask: (X, Y, Z), ``> 0`` inside; None: the whole volume.
        tile: period of the borders in voxels (>= 1).
        offset: position(s) of the borders modulo ``tile``.
        near: (first, last) distance in planes of the neighbour planes, 1 <= first <= last.

    Returns:
        ``{"x", "y", "z", "all"}``: the ratio per axis and pooled over the three axes (all border voxel pairs over
        all neighbour voxel pairs); NaN where there is no border or neighbour pair inside the mask, or no gradient.
    """
    x = _volume(chi, "chi").astype(np.float64)
    m = np.ones(x.shape, bool) if mask is None else np.nan_to_num(_volume(mask, "mask").astype(np.float64)) > 0
    _check_shapes(chi=x, mask=m)
    if isinstance(tile, bool) or int(tile) != tile or tile < 1:
        raise ValueError(f"tile must be an integer >= 1, got {tile!r}")
    offsets = [offset] if isinstance(offset, (int, np.integer)) else list(offset)
    if not offsets or any(isinstance(o, bool) or int(o) != o for o in offsets):
        raise ValueError(f"offset must be an integer or a non-empty sequence of integers, got {offset!r}")
    lo, hi = (int(v) for v in near)
    if not 1 <= lo <= hi:
        raise ValueError(f"near must be (first, last) with 1 <= first <= last, got {near!r}")
    x = np.where(m & np.isfinite(x), x, 0.0)
    sums = {"border": np.zeros(4), "near": np.zeros(4)}
    counts = {"border": np.zeros(4), "near": np.zeros(4)}
    for axis in range(3):
        n = x.shape[axis]
        planes = np.arange(1, n)
        borders = planes[np.isin(planes % int(tile), [int(o) % int(tile) for o in offsets])]
        if borders.size == 0:
            continue
        distance = np.abs(planes[:, None] - borders[None, :]).min(axis=1)
        grad = np.abs(np.diff(x, axis=axis))
        pair = np.logical_and(m.take(range(0, n - 1), axis=axis), m.take(range(1, n), axis=axis))
        plane_sum = np.moveaxis(grad * pair, axis, 0).sum(axis=(1, 2))
        plane_count = np.moveaxis(pair, axis, 0).sum(axis=(1, 2))
        for kind, select in (("border", distance == 0), ("near", (distance >= lo) & (distance <= hi))):
            sums[kind][axis] = plane_sum[select].sum()
            counts[kind][axis] = plane_count[select].sum()
    for kind in sums:
        sums[kind][3], counts[kind][3] = sums[kind][:3].sum(), counts[kind][:3].sum()
    out = {}
    for i, name in enumerate(("x", "y", "z", "all")):
        if counts["border"][i] == 0 or counts["near"][i] == 0 or sums["near"][i] == 0:
            out[name] = math.nan
        else:
            out[name] = float((sums["border"][i] / counts["border"][i]) / (sums["near"][i] / counts["near"][i]))
    return out


def compute_all(
    pred,
    truth,
    mask,
    labels=None,
    lesion_ids=None,
    voxel_size: Sequence[float] = (1.0, 1.0, 1.0),
    lesion_label_ids: Sequence[int] = LESION_LABEL_IDS,
) -> dict[str, float]:
    """Every metric of one case, as floats (NaN where a metric does not apply).

    Always: ``nrmse``, ``nrmse_2016``, ``nrmse_detrended``, ``hfen``, ``xsim``, ``ssim``, ``psnr``, ``pearson``.
    With ``labels`` (tissue label map): ``dgm_linearity``, ``calcification_moment``, ``calcification_streaking``
    and QSM-CI's detrended region NRMSEs ``nrmse_tissue`` (7–9), ``nrmse_blood`` (11, dilated) and ``nrmse_dgm``
    (1–6). With ``lesion_ids`` (lesion instance map), or else ``labels`` (``lesion_label_ids``, connected
    components): ``lesion_count`` and ``lesion_total_chi_error`` = mean over lesions of 100·|relative error| (%);
    with ``labels`` also ``microbleed_count`` and ``microbleed_total_chi_error``, the same over the lesions whose
    voxels are mostly labelled :data:`MICROBLEED_LABEL_ID`, and ``microbleed_total_chi_bias``, the mean signed
    relative error (%; negative: total χ under-estimated). ``voxel_size`` (mm) gives the voxel volume for the
    lesion totals.
    """
    r, t, m = _prepare(pred, truth, mask)
    pair = dict(zip(("nrmse", "nrmse_detrended"), _nrmse_pair(r, t, m)))  # one demeaning and fit for both
    out = {name: pair[name] if name in pair else metric(r, t, m) for name, metric in _PREPARED.items()}
    seg = None if labels is None else _labels(labels, m.shape)
    if seg is not None:
        out["dgm_linearity"] = _dgm_linearity(r, t, seg, DGM_LABEL_IDS)
        out["calcification_moment"], out["calcification_streaking"] = _calcification(r, t, seg, CALCIFICATION_LABEL_ID)
        out.update(_region_nrmses(r, t, m, seg))
    if lesion_ids is not None or seg is not None:
        voxel_volume = float(np.prod(np.asarray(_to_numpy(voxel_size, "voxel_size"), dtype=np.float64)))
        if lesion_ids is not None:
            lesions = _lesion_totals(r, t, _labels(lesion_ids, m.shape), voxel_volume, None, False, tissue=seg)
        else:
            lesions = _lesion_totals(r, t, seg, voxel_volume, tuple(lesion_label_ids), True, tissue=seg)
        errors = [abs(x["relative_error"]) for x in lesions if math.isfinite(x["relative_error"])]
        out["lesion_count"] = float(len(lesions))
        out["lesion_total_chi_error"] = 100.0 * float(np.mean(errors)) if errors else math.nan
        if seg is not None:
            bleeds = [x for x in lesions if x["tissue_label"] == MICROBLEED_LABEL_ID]
            signed = [x["relative_error"] for x in bleeds if math.isfinite(x["relative_error"])]
            out["microbleed_count"] = float(len(bleeds))
            out["microbleed_total_chi_error"] = 100.0 * float(np.mean(np.abs(signed))) if signed else math.nan
            out["microbleed_total_chi_bias"] = 100.0 * float(np.mean(signed)) if signed else math.nan
    return {k: float(v) for k, v in out.items()}


#: The per-case metrics of :data:`CASE_METRICS` on prepared arrays (:func:`_prepare`'s r, t, m).
_PREPARED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]] = {
    "nrmse": lambda r, t, m: _nrmse_pair(r, t, m)[0],
    "nrmse_2016": _nrmse_2016,
    "nrmse_detrended": lambda r, t, m: _nrmse_pair(r, t, m)[1],
    "hfen": _hfen,
    "xsim": _xsim,
    "ssim": _ssim_standard,
    "psnr": _psnr,
    "pearson": _pearson,
}


@dataclass(frozen=True)
class PreparedCase:
    """A map, its truth and its mask as every metric reads them (:func:`prepare_case`): float64 prediction ``r``
    and truth ``t``, both 0 outside the boolean mask ``m`` (non-finite values of ``r`` → 0)."""

    r: np.ndarray
    t: np.ndarray
    m: np.ndarray


def prepare_case(pred, truth, mask) -> PreparedCase:
    """Convert, check and mask one map with its truth once, for several :func:`metric_of` calls (volumes (X, Y, Z),
    leading singleton dimensions allowed; the errors of the single metrics on bad input)."""
    return PreparedCase(*_prepare(pred, truth, mask))


def metric_of(case: PreparedCase, name: str) -> float:
    """One per-case metric (a key of :data:`CASE_METRICS`) of a :func:`prepare_case` result: the same value as the
    function of that name on the unprepared volumes."""
    if name not in _PREPARED:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(_PREPARED)}")
    return float(_PREPARED[name](case.r, case.t, case.m))


#: Per-case metrics of (pred, truth, mask), usable by :class:`QSMMetric`.
CASE_METRICS: dict[str, Callable[[Any, Any, Any], float]] = {
    "nrmse": nrmse,
    "nrmse_2016": nrmse_2016,
    "nrmse_detrended": nrmse_detrended,
    "hfen": hfen,
    "xsim": xsim,
    "ssim": ssim,
    "psnr": psnr,
    "pearson": pearson,
}

_HIGHER_IS_BETTER = {"xsim": True, "ssim": True, "psnr": True, "pearson": True}
_LOWER_IS_BETTER = (
    "nrmse",
    "nrmse_2016",
    "nrmse_detrended",
    "nrmse_tissue",
    "nrmse_blood",
    "nrmse_dgm",
    "hfen",
    "dgm_linearity",
    "calcification_moment",
    "calcification_streaking",
    "lesion_total_chi_error",
    "microbleed_total_chi_error",
)
_HIGHER_IS_BETTER.update({k: False for k in _LOWER_IS_BETTER})


def higher_is_better(metric_name: str) -> bool:
    """Whether a larger value of ``metric_name`` (a key of :func:`compute_all`) is better."""
    if metric_name not in _HIGHER_IS_BETTER:
        raise ValueError(f"unknown metric {metric_name!r}; known: {sorted(_HIGHER_IS_BETTER)}")
    return _HIGHER_IS_BETTER[metric_name]


# ---------------------------------------------------------------------------------------------------------------
# Ignite


def _cases(data: Any, name: str) -> list:
    """Per-case items of a decollated list, or of a batched (B, 1, X, Y, Z) / single (1, X, Y, Z) tensor."""
    if isinstance(data, (list, tuple)):
        return list(data)
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return list(data) if data.ndim == 5 else [data]
    raise ValueError(f"{name}: expected a list of per-case volumes or a tensor, got {type(data).__name__}")


class QSMMetric(Metric):
    """Mean over cases of a per-case QSM metric (:data:`CASE_METRICS`), as an Ignite metric.

    ``output_transform`` must turn ``engine.state.output`` into ``(preds, labels, masks)``: lists of channel-first
    (1, X, Y, Z) volumes (MONAI's decollated output) or batched (B, 1, X, Y, Z) tensors. The default is
    ``monai.handlers.from_engine(["pred", "label", "mask"])``. Each case is scored with the standalone function
    and :meth:`compute` returns the mean over all cases seen since the last reset. Use
    :func:`higher_is_better` to choose the comparison for a key metric (NRMSE and HFEN: lower is better).

    Example (MONAI ``SupervisedEvaluator``)::

        key_val_metric={"val_nrmse": QSMMetric("nrmse", output_transform=from_engine(["pred", "label", "mask"]))}
    """

    required_output_keys = ("pred", "label", "mask")

    def __init__(
        self,
        metric: str = "nrmse",
        output_transform: Callable | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if metric not in CASE_METRICS:
            raise ValueError(f"unknown QSM metric {metric!r}; expected one of {sorted(CASE_METRICS)}")
        self.metric = metric
        self._fn = CASE_METRICS[metric]
        if output_transform is None:
            from monai.handlers import from_engine

            output_transform = from_engine(["pred", "label", "mask"])
        # skip_unrolling: Ignite would otherwise try to split the 3-tuple of lists as (y_pred, y) pairs
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.int64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence) -> None:
        if isinstance(output, Mapping) or not isinstance(output, Sequence) or len(output) != 3:
            raise ValueError(
                f"QSMMetric({self.metric!r}) expects (preds, labels, masks) from its output_transform, "
                f"got {type(output).__name__}" + (f" of length {len(output)}" if isinstance(output, Sequence) else "")
            )
        preds, labels, masks = (_cases(x, n) for x, n in zip(output, ("pred", "label", "mask")))
        if not len(preds) == len(labels) == len(masks):
            raise ValueError(
                f"QSMMetric({self.metric!r}): {len(preds)} preds, {len(labels)} labels and {len(masks)} masks"
            )
        for pred, label, mask in zip(preds, labels, masks):
            self._sum += self._fn(pred, label, mask)
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if int(self._count) == 0:
            raise NotComputableError(f"QSMMetric({self.metric!r}) must have at least one case before compute()")
        return float(self._sum) / int(self._count)
