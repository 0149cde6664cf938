"""QSM metrics: agreement with the QSM-CI scorer, independent formulas, edge cases and the Ignite metric."""

import math

import numpy as np
import pytest
import torch
from conftest import require
from ignite.engine import Engine
from scipy.ndimage import gaussian_filter

from scripts import metrics as M
from scripts.inference import CropSlidingWindowInferer

# QSM-CI key -> our compute_all key
QSMCI_KEYS = {
    "nrmse": "nrmse",
    "nrmse_detrend": "nrmse_detrended",
    "hfen": "hfen",
    "xsim": "xsim",
    "correlation": "pearson",
    "dgm_linearity": "dgm_linearity",
    "calc_moment_dev": "calcification_moment",
    "calc_streak": "calcification_streaking",
    "nrmse_tissue": "nrmse_tissue",
    "nrmse_blood": "nrmse_blood",
    "nrmse_dgm": "nrmse_dgm",
}


def random_case(shape=(20, 22, 24), seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(shape) * 0.05
    pred = 0.7 * truth + rng.standard_normal(shape) * 0.03 + 0.01
    mask = np.zeros(shape)
    mask[2:-3, 3:-2, 1:-4] = 1
    mask[5:8, 6:9, 5:8] = 0  # a hole
    labels = rng.integers(0, 12, shape)
    calc = tuple(slice(n // 2 - 1, n // 2 + 2) for n in shape)  # 3³ voxels
    labels[calc] = 16
    truth[calc] = -0.35 + rng.standard_normal((3, 3, 3)) * 0.02
    pred[calc] = -0.25
    return pred, truth, mask, labels


def smooth_phantom(n=32, seed=1):
    """Ellipsoidal 'brain' with DGM-like blobs, a vein, a calcification and a microbleed (ppm)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) - (n - 1) / 2,) * 3, indexing="ij")
    mask = (x / 13) ** 2 + (y / 14) ** 2 + (z / 12) ** 2 <= 1
    labels = np.where(mask, 8, 0)
    truth = np.where(mask, -0.03, 0.0) + gaussian_filter(rng.standard_normal((n,) * 3), 2.0) * 0.02 * mask
    centres = [(-6, 3, 0), (6, 3, 0), (-4, -3, 2), (4, -3, 2), (0, -8, -4), (0, 6, -5)]
    values = [0.044, 0.131, 0.038, 0.100, 0.152, 0.111]
    for label, (c, v) in enumerate(zip(centres, values), start=1):
        sel = mask & ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= 4.0)
        labels[sel], truth[sel] = label, v
    vein = mask & (np.abs(x) <= 0.5) & (np.abs(z - 6) <= 1.0)
    labels[vein], truth[vein] = 11, 0.3
    calc = (x + 7) ** 2 + (y - 9) ** 2 + (z + 1) ** 2 <= 2.5
    labels[calc], truth[calc] = 16, -0.4
    bleed = (x - 8) ** 2 + (y + 8) ** 2 + (z - 1) ** 2 <= 1.5
    labels[bleed], truth[bleed] = 17, 0.6
    pred = gaussian_filter(truth, 0.8) * 0.85 + rng.standard_normal((n,) * 3) * 0.01 + 0.02
    return pred, truth, mask.astype(np.float64), labels


def qsmci_scores(pred, truth, mask, labels):
    qsm_eval = require("qsm_ci.qsm_eval", "metrics against the QSM-CI scorer (HFEN, DGM linearity, calcification)")
    scores, _ = qsm_eval.score_arrays(
        np.array(pred, np.float64), np.array(truth, np.float64), np.array(mask, np.float64), seg=labels
    )
    return scores


@pytest.mark.parametrize("case", ["random", "random_float32_tensors", "smooth", "smooth_nan_voxel"])
def test_agrees_with_qsm_ci(case):
    pred, truth, mask, labels = random_case() if case.startswith("random") else smooth_phantom()
    if case.endswith("float32_tensors"):
        pred, truth = (torch.as_tensor(v, dtype=torch.float32) for v in (pred, truth))
        pred, truth, mask = pred[None], truth[None], torch.as_tensor(mask)[None]  # channel-first
    if case.endswith("nan_voxel"):
        pred = pred.copy()
        pred[16, 16, 16], pred[15, 16, 16] = np.nan, np.inf  # QSM-CI scores a non-finite voxel as 0
    ref = qsmci_scores(
        *(np.asarray(v, np.float64).reshape(np.shape(labels)) for v in (pred, truth, mask)), labels=labels
    )
    ours = M.compute_all(pred, truth, mask, labels=labels)
    for qkey, key in QSMCI_KEYS.items():
        assert math.isfinite(ref[qkey]), (qkey, ref[qkey])
        assert ours[key] == pytest.approx(ref[qkey], abs=1e-6, rel=1e-9), key
    # the standalone functions give the same numbers
    assert M.nrmse(pred, truth, mask) == ours["nrmse"]
    assert M.nrmse_detrended(pred, truth, mask) == ours["nrmse_detrended"]
    assert M.hfen(pred, truth, mask) == ours["hfen"]
    assert M.xsim(pred, truth, mask) == ours["xsim"]
    assert M.pearson(pred, truth, mask) == ours["pearson"]
    assert M.dgm_linearity(pred, truth, labels, mask=mask) == ours["dgm_linearity"]
    assert M.calcification_moment(pred, truth, labels, mask) == ours["calcification_moment"]
    assert M.calcification_streaking(pred, truth, labels, mask) == ours["calcification_streaking"]


def test_qsm_ci_without_segmentation():
    pred, truth, mask, _ = smooth_phantom(24)
    ref = qsmci_scores(pred, truth, mask, labels=None)
    ours = M.compute_all(torch.as_tensor(pred), torch.as_tensor(truth), torch.as_tensor(mask) > 0)
    for qkey in ("nrmse", "nrmse_detrend", "hfen", "correlation", "xsim"):
        assert ours[QSMCI_KEYS[qkey]] == pytest.approx(ref[qkey], abs=1e-6, rel=1e-9)
    assert "dgm_linearity" not in ours and "lesion_total_chi_error" not in ours


def test_nrmse_family_against_numpy_formulas():
    pred, truth, mask, _ = random_case(seed=3)
    m = mask > 0
    r, t = pred[m], truth[m]
    rd, td = r - r.mean(), t - t.mean()
    assert M.nrmse(pred, truth, mask) == pytest.approx(100 * np.linalg.norm(rd - td) / np.linalg.norm(td), rel=1e-12)
    assert M.nrmse_2016(pred, truth, mask) == pytest.approx(100 * np.linalg.norm(r - t) / np.linalg.norm(t), rel=1e-12)
    slope, intercept = np.polyfit(td, rd, 1)
    detrended = 100 * np.linalg.norm((rd - intercept) / slope - td) / np.linalg.norm(td)
    assert M.nrmse_detrended(pred, truth, mask) == pytest.approx(detrended, rel=1e-9)
    assert M.pearson(pred, truth, mask) == pytest.approx(np.corrcoef(r, t)[0, 1], rel=1e-12)
    rmse = np.sqrt(np.mean((rd - td) ** 2))
    assert M.psnr(pred, truth, mask) == pytest.approx(20 * np.log10((t.max() - t.min()) / rmse), rel=1e-12)
    # values outside the mask do not matter; an offset does not change the demeaned NRMSE
    noisy_outside = np.where(m, pred, 5.0)
    assert M.nrmse(noisy_outside, truth, mask) == M.nrmse(pred, truth, mask)
    assert M.nrmse(pred + 0.3, truth, mask) == pytest.approx(M.nrmse(pred, truth, mask), rel=1e-9)
    # an affine distortion of the truth is undone by detrending
    assert M.nrmse_detrended(2 * truth - 0.1, truth, mask) == pytest.approx(0, abs=1e-9)


def brute_force_ssim(a, b, m, k1, k2, dynamic_range, w=5):
    """SSIM map averaged over m, window = the in-volume part of the w³ cube around each voxel."""
    a, b = np.where(m, a, 0.0), np.where(m, b, 0.0)
    c1, c2, h = (k1 * dynamic_range) ** 2, (k2 * dynamic_range) ** 2, w // 2
    values = []
    for i, j, k in zip(*np.nonzero(m)):
        sl = tuple(slice(max(p - h, 0), p + h + 1) for p in (i, j, k))
        x, y = a[sl].ravel(), b[sl].ravel()
        mx, my = x.mean(), y.mean()
        vx, vy, cxy = x.var(), y.var(), np.mean((x - mx) * (y - my))
        values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_xsim_and_ssim_against_brute_force():
    pred, truth, mask, _ = random_case(shape=(8, 9, 7), seed=4)
    mask = np.ones_like(mask)
    mask[0, 0, 0] = 0
    m = mask > 0
    assert M.xsim(pred, truth, mask) == pytest.approx(brute_force_ssim(pred, truth, m, 0.01, 0.001, 1.0), rel=1e-9)
    span = truth[m].max() - truth[m].min()
    assert M.ssim(pred, truth, mask) == pytest.approx(brute_force_ssim(pred, truth, m, 0.01, 0.03, span), rel=1e-9)


def test_identical_inputs_are_perfect():
    _, truth, mask, _ = smooth_phantom(24)
    truth_t = torch.as_tensor(truth, dtype=torch.float32)
    assert M.hfen(truth_t, truth_t, mask) == 0.0
    assert M.xsim(truth_t, truth_t, mask) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(truth_t, truth_t, mask) == pytest.approx(1.0, abs=1e-12)
    assert M.nrmse(truth_t, truth_t, mask) == 0.0 and M.nrmse_detrended(truth_t, truth_t, mask) == 0.0
    assert M.pearson(truth_t, truth_t, mask) == pytest.approx(1.0, abs=1e-12)
    assert M.psnr(truth_t, truth_t, mask) == math.inf


def test_metrics_degrade_monotonically_with_noise():
    _, truth, mask, _ = smooth_phantom(24)
    noise = np.random.default_rng(5).standard_normal(truth.shape)
    levels = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1]
    scores = [M.compute_all(truth + s * noise, truth, mask) for s in levels]
    for key in ("hfen", "nrmse"):
        values = [s[key] for s in scores]
        assert all(a < b for a, b in zip(values, values[1:])), (key, values)
    for key in ("xsim", "ssim", "psnr", "pearson"):
        values = [s[key] for s in scores]
        assert all(a > b for a, b in zip(values, values[1:])), (key, values)


def test_lesion_total_susceptibility_by_hand():
    shape = (10, 10, 10)
    truth, pred, instances = np.zeros(shape), np.zeros(shape), np.zeros(shape, np.int16)
    instances[1:3, 1:3, 1:3] = 1  # 8 voxels
    truth[1:3, 1:3, 1:3], pred[1:3, 1:3, 1:3] = 0.5, 0.25
    instances[6, 6, 5:8] = 2  # 3 voxels
    truth[6, 6, 5:8] = [-0.2, -0.3, -0.4]
    pred[6, 6, 5:8] = [-0.3, -0.3, -0.3]
    voxel = (0.5, 1.0, 3.0)  # 1.5 mm³
    mask = np.ones(shape)
    lesions = M.lesion_total_susceptibility(pred, truth, instances, voxel_volume_mm3=1.5)
    assert [x["lesion"] for x in lesions] == [1, 2] and [x["voxels"] for x in lesions] == [8, 3]
    assert lesions[0]["truth_total_ppm_mm3"] == pytest.approx(8 * 0.5 * 1.5)
    assert lesions[0]["pred_total_ppm_mm3"] == pytest.approx(8 * 0.25 * 1.5)
    assert lesions[0]["relative_error"] == pytest.approx(-0.5)
    assert lesions[0]["volume_mm3"] == pytest.approx(12.0)
    assert lesions[1]["truth_total_ppm_mm3"] == pytest.approx(-0.9 * 1.5)
    assert lesions[1]["pred_total_ppm_mm3"] == pytest.approx(-0.9 * 1.5)
    assert lesions[1]["relative_error"] == pytest.approx(0.0, abs=1e-12)
    # a tissue label map: both lesions carry label 17, separated by connected components
    tissue = np.where(instances > 0, 17, 8)
    by_label = M.lesion_total_susceptibility(pred, truth, tissue, 1.5, label_ids=(16, 17))
    assert [x["voxels"] for x in by_label] == [8, 3] and [x["label"] for x in by_label] == [17, 17]
    assert [x["relative_error"] for x in by_label] == pytest.approx([-0.5, 0.0], abs=1e-12)
    merged = M.lesion_total_susceptibility(pred, truth, tissue, 1.5, label_ids=(17,), connected_components=False)
    assert len(merged) == 1 and merged[0]["truth_total_ppm_mm3"] == pytest.approx((4.0 - 0.9) * 1.5)
    out = M.compute_all(pred, truth, mask, lesion_ids=instances, voxel_size=voxel)
    assert out["lesion_count"] == 2 and out["lesion_total_chi_error"] == pytest.approx(25.0)
    out = M.compute_all(pred, truth, mask, labels=tissue, voxel_size=voxel)
    assert out["lesion_count"] == 2 and out["lesion_total_chi_error"] == pytest.approx(25.0)
    assert out["microbleed_count"] == 2 and out["microbleed_total_chi_error"] == pytest.approx(25.0)
    # instances typed by the tissue labels: lesion 2 is a calcification, so only lesion 1 (−50 %) is a microbleed
    typed = np.where(instances == 2, 16, tissue)
    out = M.compute_all(pred, truth, mask, labels=typed, lesion_ids=instances, voxel_size=voxel)
    assert out["lesion_count"] == 2 and out["lesion_total_chi_error"] == pytest.approx(25.0)
    assert out["microbleed_count"] == 1 and out["microbleed_total_chi_error"] == pytest.approx(50.0)
    assert out["microbleed_total_chi_bias"] == pytest.approx(-50.0)
    assert M.lesion_total_susceptibility(pred, truth, np.zeros(shape), 1.0) == []
    # grown by one voxel: the first lesion's 4³ neighbourhood, where a smeared reconstruction is counted too
    smeared = pred.copy()
    smeared[0, 1:3, 1:3] = 0.1  # 4 voxels just outside lesion 1
    grown = M.lesion_total_susceptibility(smeared, truth, instances, 1.0, dilation_voxels=1)
    assert grown[0]["voxels"] == 64 and grown[0]["volume_mm3"] == 64.0  # the box [0, 4)³
    assert grown[0]["pred_total_ppm_mm3"] == pytest.approx(8 * 0.25 + 4 * 0.1)
    assert grown[0]["truth_total_ppm_mm3"] == pytest.approx(8 * 0.5)


def test_bad_inputs_raise():
    pred, truth, mask, labels = random_case(shape=(8, 8, 8))
    with pytest.raises(ValueError, match="shape mismatch"):
        M.nrmse(pred[:-1], truth, mask)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.compute_all(pred, truth, mask, labels=labels[:, :, :-1])
    with pytest.raises(ValueError, match="empty mask"):
        M.xsim(pred, truth, np.zeros_like(mask))
    with pytest.raises(ValueError, match="3-D"):
        M.hfen(pred[0], truth[0], mask[0])
    with pytest.raises(ValueError, match="3-D"):
        M.hfen(np.stack([pred, pred]), np.stack([truth, truth]), np.stack([mask, mask]))
    bad = truth.copy()
    bad[4, 4, 4] = np.nan
    with pytest.raises(ValueError, match="truth has non-finite"):
        M.nrmse(pred, bad, np.ones_like(mask))
    with pytest.raises(ValueError, match="voxel_volume"):
        M.lesion_total_susceptibility(pred, truth, labels, voxel_volume_mm3=0)
    with pytest.raises(ValueError, match="unknown QSM metric"):
        M.QSMMetric("dice")
    with pytest.raises(ValueError, match="unknown metric"):
        M.higher_is_better("dice")


def test_prepared_case_metrics_equal_the_single_metrics():
    """prepare_case + metric_of (the case report's metrics, several per preparation) and compute_all give exactly
    what each metric's own function gives (a map with NaNs and values outside the mask, torch and numpy inputs);
    an unknown name is refused with the known ones, an empty mask as by the single metrics."""
    rng = np.random.default_rng(5)
    truth = _smooth((20, 22, 18), seed=1)
    pred = truth + 0.3 * _smooth((20, 22, 18), seed=2) + 0.05 * rng.standard_normal(truth.shape)
    pred[0, 0, 0] = np.nan
    mask = np.zeros(truth.shape, bool)
    mask[3:17, 4:19, 2:16] = True
    names = tuple(M.CASE_METRICS)
    case = M.prepare_case(torch.from_numpy(pred), truth, mask)
    every = M.compute_all(pred, truth, mask)
    assert list(every)[: len(names)] == list(names)
    for name in names:
        single = M.CASE_METRICS[name](pred, truth, mask)
        assert M.metric_of(case, name) == single == every[name], name
    with pytest.raises(ValueError, match=r"unknown metric 'nrsme'.*'nrmse'"):
        M.metric_of(case, "nrsme")
    with pytest.raises(ValueError, match="empty mask"):
        M.prepare_case(pred, truth, np.zeros_like(mask))


def test_higher_is_better():
    assert not M.higher_is_better("nrmse") and not M.higher_is_better("hfen")
    assert not M.higher_is_better("lesion_total_chi_error") and not M.higher_is_better("dgm_linearity")
    assert M.higher_is_better("xsim") and M.higher_is_better("ssim") and M.higher_is_better("psnr")
    pred, truth, mask, labels = random_case(shape=(12, 12, 12))
    for key in M.compute_all(pred, truth, mask, labels=labels):
        if not key.endswith(("_count", "_bias")):  # counts and signed biases have no better direction
            M.higher_is_better(key)  # every score has a direction


def _cases(n, shape=(12, 12, 12)):
    out = []
    for seed in range(n):
        pred, truth, mask, _ = random_case(shape, seed=10 + seed)
        volumes = zip(("pred", "label", "mask"), (pred, truth, mask))
        out.append({k: torch.as_tensor(v, dtype=torch.float32)[None] for k, v in volumes})
    return out


@pytest.mark.parametrize("name", ["nrmse", "xsim", "hfen", "psnr", "ssim"])
def test_ignite_metric_is_mean_of_case_values(name):
    batches = [_cases(2), _cases(3)[1:]]  # two iterations of decollated outputs (lists of per-case dicts)
    engine = Engine(lambda e, batch: batch)
    metric = M.QSMMetric(name)
    metric.attach(engine, f"val_{name}")
    state = engine.run(batches, max_epochs=1)
    cases = [c for b in batches for c in b]
    expected = np.mean([getattr(M, name)(c["pred"], c["label"], c["mask"]) for c in cases])
    assert state.metrics[f"val_{name}"] == pytest.approx(expected, rel=1e-12)
    # batched (B, 1, X, Y, Z) tensors work too, and reset() starts over
    metric.reset()
    metric.update(tuple(torch.stack([c[k] for c in cases]) for k in ("pred", "label", "mask")))
    assert metric.compute() == pytest.approx(expected, rel=1e-12)
    metric.reset()
    with pytest.raises(Exception, match="at least one case"):
        metric.compute()


def test_ignite_metric_in_supervised_evaluator():
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.handlers import from_engine
    from monai.transforms import Compose, CopyItemsd

    cases = _cases(3)
    data = [{"image": c["pred"], "label": c["label"], "mask": c["mask"]} for c in cases]
    inputs = from_engine(["pred", "label", "eval_mask"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(data, batch_size=2),
        network=torch.nn.Identity(),
        postprocessing=Compose([CopyItemsd(keys="mask", names="eval_mask")]),
        key_val_metric={"val_nrmse": M.QSMMetric("nrmse", output_transform=inputs)},
        additional_metrics={"val_xsim": M.QSMMetric("xsim", output_transform=inputs)},
        metric_cmp_fn=lambda current, previous: current < previous,
    )
    evaluator.run()
    for key, fn in (("val_nrmse", M.nrmse), ("val_xsim", M.xsim)):
        expected = np.mean([fn(c["pred"], c["label"], c["mask"]) for c in cases])
        assert evaluator.state.metrics[key] == pytest.approx(expected, rel=1e-12)
    assert evaluator.state.best_metric == pytest.approx(evaluator.state.metrics["val_nrmse"])


# ------------------------------------------------------------------------------------ tile seams


def _smooth(shape, seed=0, sigma=3.0):
    return gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)


def test_tile_seam_ratio_by_hand():
    """χ rising by 1 per voxel along x except 3 across plane 10 (between voxels 9 and 10): border plane 10 over
    the planes 2–6 away (4–8, 12–16) = 3; y and z have no border inside 3 voxels (NaN), so the pooled ratio is x's.
    A mask that leaves out voxel 10 removes the border pair: NaN."""
    steps = np.ones(19)
    steps[9] = 3.0  # χ[10] − χ[9]
    chi = np.broadcast_to(np.concatenate([[0.0], np.cumsum(steps)])[:, None, None], (20, 3, 3))
    ratio = M.tile_seam_ratio(torch.from_numpy(chi.copy())[None], None, tile=10, offset=0)
    assert ratio["x"] == pytest.approx(3.0) and ratio["all"] == pytest.approx(3.0)
    assert math.isnan(ratio["y"]) and math.isnan(ratio["z"])
    # borders every 10 from offset 5: planes 5 and 15; 10 is 5 away from both, a neighbour: (1 + 1)/(…+3…) < 1
    assert M.tile_seam_ratio(chi, None, tile=10, offset=5)["x"] < 1
    mask = np.ones(chi.shape)
    mask[10] = 0
    assert math.isnan(M.tile_seam_ratio(chi, mask, tile=10)["x"])


def test_tile_seam_ratio_is_near_one_for_a_smooth_map_and_large_for_steps_at_the_borders():
    smooth = _smooth((100, 110, 96))
    for offset in (0, 17, (0, 12)):
        ratio = M.tile_seam_ratio(smooth, None, tile=48, offset=offset)
        assert all(0.8 < v < 1.25 for v in ratio.values()), (offset, ratio)
    stepped = smooth.copy()
    for axis in range(3):  # a step of half the map's spread at x, y, z = 48 and 96
        index = [slice(None)] * 3
        index[axis] = slice(48, None)
        stepped[tuple(index)] += 0.5 * smooth.std()
        index[axis] = slice(96, None)
        stepped[tuple(index)] += 0.5 * smooth.std()
    ratio = M.tile_seam_ratio(stepped, np.ones(stepped.shape), tile=48, offset=0)
    assert all(v > 2 for v in ratio.values()), ratio
    assert 0.8 < M.tile_seam_ratio(stepped, None, tile=48, offset=24)["all"] < 1.25  # borders elsewhere: no seam
    mask = np.zeros(stepped.shape, bool)
    mask[:, :, :40] = True  # only z < 40: no z border pair, and the x and y steps are still inside
    masked = M.tile_seam_ratio(stepped, mask, tile=48)
    assert math.isnan(masked["z"]) and masked["x"] > 2 and masked["y"] > 2


def test_tile_seam_ratio_finds_the_inferers_tile_borders():
    """A network that adds its own random offset to each window leaves steps exactly where the inferer's output
    tiles meet: ``tile_faces``/``window_starts`` in the unpadded volume (the padding by the margin does not shift
    them), which the metric sees at ``offset=0``, and not half a tile away."""
    gen = torch.Generator().manual_seed(0)

    def offset_per_window(x):
        m = 4
        crop = x[..., m:-m, m:-m, m:-m]
        return crop + crop.std() * torch.randn(x.shape[0], 1, 1, 1, 1, generator=gen)

    field = torch.from_numpy(_smooth((64, 56, 40), sigma=2.0)).float()[None, None]
    inferer = CropSlidingWindowInferer(24, 4, skip_empty=False)
    assert inferer.tile_faces(field.shape[-3:]) == [[16, 32, 48], [16, 32, 48], [16, 32]]
    with torch.no_grad():
        out = inferer(field, offset_per_window)
    assert M.tile_seam_ratio(out, None, tile=16, offset=0)["all"] > 2
    assert 0.8 < M.tile_seam_ratio(out, None, tile=16, offset=8)["all"] < 1.25


def test_tile_seam_ratio_bad_arguments():
    chi = np.zeros((10, 10, 10))
    with pytest.raises(ValueError, match="tile"):
        M.tile_seam_ratio(chi, None, tile=0)
    with pytest.raises(ValueError, match="near"):
        M.tile_seam_ratio(chi, None, tile=4, near=(0, 3))
    with pytest.raises(ValueError, match="offset"):
        M.tile_seam_ratio(chi, None, tile=4, offset=[])
    with pytest.raises(ValueError, match="shape mismatch"):
        M.tile_seam_ratio(chi, np.ones((10, 10, 9)), tile=4)
    assert math.isnan(M.tile_seam_ratio(chi, None, tile=4)["all"])  # no gradient at all


def test_filtered_metrics_on_the_mask_box_equal_the_whole_volume():
    """HFEN and XSIM/SSIM filter only the mask's bounding box grown by the filter's radius: a small mask off-centre
    in a large volume (one face on the volume's border, where the boundary modes act) gives the whole-volume values
    to rounding."""
    from scripts.metrics import _hfen, _prepare, _ssim

    rng = np.random.default_rng(3)
    shape = (50, 44, 38)
    mask = np.zeros(shape, bool)
    mask[0:17, 20:31, 9:30] = rng.random((17, 11, 21)) > 0.2
    truth = rng.standard_normal(shape)
    pred = truth + 0.3 * rng.standard_normal(shape)
    r, t, m = _prepare(pred, truth, mask)
    assert _hfen(r, t, m) == pytest.approx(_hfen(r, t, m, crop=False), rel=1e-10)
    for k2, dynamic_range in ((0.001, 1.0), (0.03, 4.0)):
        assert _ssim(r, t, m, 0.01, k2, dynamic_range) == pytest.approx(
            _ssim(r, t, m, 0.01, k2, dynamic_range, crop=False), rel=1e-10
        )


def test_truth_side_work_is_reused_only_for_the_same_truth():
    """HFEN/XSIM reuse the truth's filtering between maps (keyed by content): the scores equal fresh computations,
    and a truth changed in place is not mistaken for the cached one."""
    from scipy.ndimage import gaussian_laplace

    rng = np.random.default_rng(3)
    truth = rng.normal(size=(20, 22, 18))
    mask = np.zeros(truth.shape, bool)
    mask[3:17, 4:18, 2:16] = True
    M._TRUTH_CACHE.clear()

    def reference_hfen(pred, t):
        r0, t0 = np.where(mask, pred, 0.0), np.where(mask, t, 0.0)
        lr, lt = gaussian_laplace(r0, 1.5, truncate=5.0), gaussian_laplace(t0, 1.5, truncate=5.0)
        return 100 * np.linalg.norm((lr - lt)[mask]) / np.linalg.norm(lt[mask])

    for k in range(3):
        pred = truth + rng.normal(scale=0.3 * (k + 1), size=truth.shape)
        assert M.hfen(pred, truth, mask) == pytest.approx(reference_hfen(pred, truth), rel=1e-9)
    assert len(M._TRUTH_CACHE) == 1  # one truth LoG served all three maps
    first = M.xsim(pred, truth, mask)
    M._TRUTH_CACHE.clear()
    assert M.xsim(pred, truth, mask) == first  # cached and fresh truth moments agree exactly
    truth[5:9, 5:9, 5:9] += 2.0  # the same array object, new content
    assert M.hfen(pred, truth, mask) == pytest.approx(reference_hfen(pred, truth), rel=1e-9)


def test_truth_cache_computes_once_for_concurrent_callers():
    # CaseReport scores its maps on several threads against one truth: the truth's filtered copies are made once
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    truth = np.random.default_rng(5).standard_normal((12, 10, 8)).astype(np.float32)
    calls, lock = [], threading.Lock()

    def slow():
        with lock:
            calls.append(1)
        time.sleep(0.05)  # long enough for every thread to arrive while the first computes
        return truth.sum()

    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(lambda _: M._truth_cached("test-concurrent", (truth,), slow), range(4)))
    assert len(calls) == 1 and len(set(values)) == 1
    # and the metrics themselves give the same values threaded as in sequence
    rng = np.random.default_rng(6)
    t = rng.standard_normal((20, 18, 16)).astype(np.float32)
    m = np.zeros(t.shape, bool)
    m[3:-3, 3:-3, 3:-3] = True
    maps = [t + 0.3 * rng.standard_normal(t.shape).astype(np.float32) for _ in range(3)]
    score = lambda r: (M.hfen(r, t, m), M.xsim(r, t, m))  # noqa: E731
    M._TRUTH_CACHE.clear()
    sequential = [score(r) for r in maps]
    M._TRUTH_CACHE.clear()
    with ThreadPoolExecutor(3) as pool:
        assert list(pool.map(score, maps)) == sequential
