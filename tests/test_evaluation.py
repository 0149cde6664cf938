"""The evaluation workflow (configs/evaluate.json over configs/inference.json) end to end through the CLI, and the
report's tables checked against metrics recomputed independently from the files it read and wrote."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE, TINY_NET, bundle_run
from PIL import Image

from scripts.baselines import METHODS, tkd
from scripts.evaluation import EvaluationReport, markdown_table, summarise
from scripts.networks import QSMGenerator, qsmgan_unet
from scripts.physics import b0_direction_from_affine, voxel_size_from_affine

CONFIGS = "['configs/inference.json','configs/evaluate.json']"
# a tiny simulated set: 40×48×40 voxels of 3.5 mm (a whole, coarse brain), the network run on a 2.5 mm grid (the
# resampling and Invertd path of inference, with few windows)
TINY_SET = ["--simulate_shape", "[40,48,40]", "--simulate_voxel_size", "[3.5,3.5,3.5]", "--voxel_size", "[2.5,2.5,2.5]"]
# the realistic set: a whole head through background removal, on a coarse grid
TINY_SET += ["--simulate#sets#realistic#shape", "[40,48,44]", "--simulate#sets#realistic#voxel_size", "[4.8,4.8,4.8]"]


def plain_nrmse(pred, truth, mask):
    """QSM challenge 2.0 NRMSE (%), written out here: both maps demeaned inside the mask."""
    m = mask > 0
    r, t = pred[m] - pred[m].mean(), truth[m] - truth[m].mean()
    return 100.0 * np.linalg.norm(r - t) / np.linalg.norm(t)


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    torch.save(QSMGenerator(qsmgan_unet(features=(4, 4, 8, 8, 8, 4))).state_dict(), tmp / "model.pt")
    out = tmp / "eval"
    args = ["--config_file", CONFIGS, "--checkpoint", str(tmp / "model.pt"), "--output_dir", str(out), *TINY_NET]
    args += [*TINY_SET, "--save_maps", "true"]
    with pytest.MonkeyPatch.context() as mp:
        # tiny volumes: one thread avoids the thread hand-offs that dominate on a busy 2-core machine
        mp.setenv("OMP_NUM_THREADS", "1")
        log = bundle_run("evaluating", *args)
    return out, log


def test_evaluate_writes_tables_and_figures(evaluation):
    out, log = evaluation
    methods = ["network alone", "network + refinement", *METHODS]
    listing = json.loads((out / "simulated" / "datalist.json").read_text())
    cases = [item["image"].replace(".nii.gz", "") for item in listing["testing"]]
    assert [c.split("_")[0] for c in cases] == ["healthy", "lesions", "random", "realistic"]
    # every set also gets a table of its own: ideal and background-removed fields are not averaged together
    summary_md = (out / "summary.md").read_text()
    assert all(f"### set: {name}" in summary_md for name in ("healthy", "lesions", "random", "realistic"))
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["method"]) for r in rows] == [(c, m) for c in cases for m in methods]
    for r in rows:
        for key in ("nrmse", "xsim", "hfen", "nrmse_detrended", "pearson", "seconds"):
            assert math.isfinite(float(r[key])), (r["case"], r["method"], key)
    by_case = {(r["case"], r["method"]): r for r in rows}
    assert math.isfinite(float(by_case[(cases[0], "tkd")]["dgm_linearity"]))  # labels came through
    assert float(by_case[(cases[1], "tkd")]["lesion_count"]) >= 1  # lesion instances came through
    assert math.isfinite(float(by_case[(cases[1], "tkd")]["lesion_total_chi_error"]))

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == methods
    for method in methods:
        values = [float(by_case[(c, method)]["nrmse"]) for c in cases]
        assert summary[method]["nrmse"]["n"] == 4
        assert summary[method]["nrmse"]["mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert summary[method]["nrmse"]["sd"] == pytest.approx(np.std(values), rel=1e-9, abs=1e-12)
    table = (out / "summary.md").read_text().split("\n\n### set")[0]  # the table of all cases, then one per set
    assert table.startswith("| method | nrmse | xsim | hfen |") and table.count("\n") == 2 + len(methods)
    assert all(f"| {m} |" in table for m in methods)
    assert "| method | nrmse" in log  # the table is also logged

    for case in cases:
        with Image.open(out / f"{case}_evaluation.png") as png:
            assert png.height > 8 * 40 and png.width > 2 * 3 * 40  # truth + 7 rows, χ and error side by side
        assert (out / f"{case}_chi.nii.gz").is_file()  # the network's χ, written as inference writes it
    assert (out / "run_info.json").is_file() and (out / "config_used.json").is_file()


def test_tkd_and_network_scores_match_an_independent_recomputation(evaluation):
    """TKD's and the network's NRMSE in the tables equal the NRMSE recomputed here: TKD called directly on the
    dataset's field file (voxel size and B0 from its affine), the network's χ read back from the NIfTI written."""
    out, _ = evaluation
    folder = out / "simulated"
    listing = json.loads((folder / "datalist.json").read_text())
    with open(out / "per_case.csv") as f:
        rows = {(r["case"], r["method"]): r for r in csv.DictReader(f)}
    tkd_values = []
    for item in listing["testing"]:
        case = item["image"].replace(".nii.gz", "")
        img = nib.load(folder / item["image"])
        field = img.get_fdata(dtype=np.float32)
        mask = nib.load(folder / item["mask"]).get_fdata() > 0
        truth = nib.load(folder / item["label"]).get_fdata() * mask
        chi = tkd(field, mask, voxel_size_from_affine(img.affine), tuple(b0_direction_from_affine(img.affine)))
        expected = plain_nrmse(chi.double().numpy(), truth, mask)
        assert float(rows[(case, "tkd")]["nrmse"]) == pytest.approx(expected, abs=1e-3)
        tkd_values.append(expected)
        written = nib.load(out / "maps" / f"{case}_tkd.nii.gz")  # --save_maps: TKD's χ as the report scored it
        assert np.allclose(written.affine, img.affine)
        assert plain_nrmse(written.get_fdata(), truth, mask) == pytest.approx(expected, abs=1e-3)
        network = nib.load(out / f"{case}_chi.nii.gz").get_fdata() * mask
        refined = float(rows[(case, "network + refinement")]["nrmse"])
        assert refined == pytest.approx(plain_nrmse(network, truth, mask), abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tkd"]["nrmse"]["mean"] == pytest.approx(np.mean(tkd_values), abs=1e-3)


def test_both_run_ids_are_defined():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "evaluate.json")])
    for run_id in ("run", "evaluating"):
        assert parser.get(run_id)[-1] == "$@evaluator.run()"
    assert parser.get("methods") == list(METHODS)
    # merged over inference.json, the require_configs check passes and the report handler replaces CaseReport
    assert parser.get("merged_configs") == ["inference.json", "evaluate.json"]
    assert parser.get("report_handlers") == ["@evaluation_report"]


def test_report_rejects_unknown_methods_and_merges_options():
    with pytest.raises(ValueError, match="unknown method.*'medi'.*known methods: tkd"):
        EvaluationReport(methods=["tkd", "medi"])
    report = EvaluationReport(methods={"tkd": {"threshold": 0.15}}, method_options={"tkd": {"pad": 0}, "tv_admm": {}})
    assert report.methods == {"tkd": {"threshold": 0.15, "pad": 0}, "tv_admm": {}}


def test_evaluation_datalist_keeps_labels_and_requires_truth(tmp_path):
    from scripts.evaluation import evaluation_datalist

    items = [{"image": "a_field.nii.gz", "mask": "a_mask.nii.gz", "label": "a_chi.nii.gz", "labels": "a_labels.nii.gz"}]
    (tmp_path / "list.json").write_text(json.dumps({"testing": items}))
    (item,) = evaluation_datalist(str(tmp_path / "list.json"), str(tmp_path / "out"))
    assert item == {k: str(tmp_path / v) for k, v in items[0].items()}
    (tmp_path / "bad.json").write_text(json.dumps({"testing": [{"image": "b_field.nii.gz"}]}))
    with pytest.raises(ValueError, match="needs the true χ"):
        evaluation_datalist(str(tmp_path / "bad.json"), str(tmp_path / "out"))


def test_summary_table_format():
    rows = [
        {"case": "a", "method": "tkd", "nrmse": 10.0, "xsim": 0.5, "seconds": 1.0},
        {"case": "b", "method": "tkd", "nrmse": 20.0, "xsim": float("nan"), "seconds": 3.0},
    ]
    summary = summarise(rows)
    assert summary["tkd"]["nrmse"] == {"mean": 15.0, "sd": 5.0, "n": 2}
    assert summary["tkd"]["xsim"]["n"] == 1  # NaN left out
    table = markdown_table(summary)
    assert "| tkd | 15.000 ± 5.000 | 0.500 ± 0.000 | 2.000 ± 1.000 |" in table


def tiny_item(dc_weight=3e-4, n=16):
    """A postprocessed item as the report handlers see it (refined χ = truth, network alone = 0.5·truth)."""
    from monai.data import MetaTensor

    from scripts.checks import INFO_KEY

    rng = np.random.default_rng(0)
    truth = torch.zeros(1, n, n, n)
    truth[0, 4:-4, 4:-4, 4:-4] = torch.as_tensor(rng.normal(0, 0.05, (n - 8,) * 3), dtype=torch.float32)
    mask = (truth != 0).float()
    meta = {"affine": torch.eye(4), "filename_or_obj": "/data/case_field.nii.gz"}
    item = {
        "image": MetaTensor(truth * 0.1, meta=dict(meta)),
        "label": MetaTensor(truth.clone(), meta=dict(meta)),
        "eval_mask": MetaTensor(mask, meta=dict(meta)),
        "pred": MetaTensor(truth.clone(), meta=dict(meta)),
        "pred_network": MetaTensor(truth * 0.5, meta=dict(meta)),
        INFO_KEY: json.dumps({"physics_check": {"dc_weight": dc_weight}}),
    }
    return item


def test_network_alone_and_refined_are_named_and_both_reported(tmp_path):
    """Issue 14: evaluation rows, summary.md, metrics.json and the log say "network alone" and
    "network + refinement" (not "network"), and the network alone is scored even when the refinement is on."""
    from scripts.evaluation import write_tables
    from scripts.inference import CaseReport

    report = EvaluationReport(output_dir=str(tmp_path / "eval"), methods=["tkd"])
    rows = report.evaluate_case(tiny_item(), 1.0, 2.0)
    assert [r["method"] for r in rows] == ["network alone", "network + refinement", "tkd"]
    assert rows[1]["nrmse"] == pytest.approx(0, abs=1e-6) and rows[0]["nrmse"] == pytest.approx(50, abs=1e-3)
    assert [r["seconds"] for r in rows[:2]] == [1.0, 2.0]
    table = markdown_table(write_tables(rows, str(tmp_path / "eval")))
    assert "| network alone |" in table and "| network + refinement |" in table and "| network |" not in table
    # without the refinement there is one network result, the network alone
    rows = EvaluationReport(output_dir=str(tmp_path / "e2"), methods=["tkd"]).evaluate_case(tiny_item(None))
    assert [r["method"] for r in rows] == ["network alone", "tkd"]

    case_report = CaseReport(str(tmp_path / "inf"), tkd_threshold=0.15)
    case_report.report(tiny_item())
    case_report.report(tiny_item(None))
    case_report.completed(None)
    records = json.loads((tmp_path / "inf" / "metrics.json").read_text())
    assert list(records[0]) == ["case", "network alone", "network + refinement", "tkd"]
    assert records[0]["network + refinement"]["nrmse_percent"] == pytest.approx(0, abs=1e-6)
    assert records[0]["network alone"]["nrmse_percent"] == pytest.approx(50, abs=1e-3)
    assert list(records[1]) == ["case", "network alone", "tkd"]


def test_inference_config_keeps_the_network_alone_before_the_refinement():
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.json"))
    targets = [t["_target_"].split(".")[-1] for t in config["postprocessing"]["transforms"]]
    copies = [t for t in config["postprocessing"]["transforms"] if t.get("names") == "pred_network"]
    assert copies and copies[0]["keys"] == "pred"
    assert targets.index("CopyItemsd", targets.index("MaskIntensityd")) < targets.index("DataConsistencyd")


def test_evaluation_uses_the_testing_section_and_names_the_cases_left_out(tmp_path, caplog):
    from scripts.evaluation import evaluation_datalist

    case = {"image": "t_field.nii.gz", "mask": "t_mask.nii.gz", "label": "t_chi.nii.gz"}
    listing = {"training": [{**case, "image": "tr1_field.nii.gz"}, "tr2_field.nii.gz"], "testing": [case]}
    (tmp_path / "list.json").write_text(json.dumps(listing))
    with caplog.at_level("WARNING"):
        items = evaluation_datalist(str(tmp_path / "list.json"), str(tmp_path / "out"))
    assert [i["image"] for i in items] == [str(tmp_path / "t_field.nii.gz")]
    assert "left out: training (2): tr1_field.nii.gz, tr2_field.nii.gz" in caplog.text
    # no testing section: refused, instead of silently evaluating the training cases
    (tmp_path / "train_only.json").write_text(json.dumps({"training": [case]}))
    with pytest.raises(ValueError, match="'testing' section.*missing or empty; it has training"):
        evaluation_datalist(str(tmp_path / "train_only.json"), str(tmp_path / "out"))


def test_simulated_evaluation_set_is_simulated_again_when_the_settings_differ(tmp_path, caplog):
    from scripts.evaluation import evaluation_datalist
    from scripts.phantoms import RandomSourcePhantom
    from scripts.simulate import SimulationSet, write_dataset

    def options(shape):
        sets = {"random": SimulationSet(RandomSourcePhantom(), num_cases=1, snr=None, splits=[0, 0, 1])}
        return {"sets": sets, "shape": shape, "voxel_size": [1.5, 1.5, 1.5], "seed": 5}

    (first,) = evaluation_datalist(None, str(tmp_path), options([16, 16, 16]))
    assert nib.load(first["image"]).shape == (16, 16, 16)
    with caplog.at_level("INFO"):
        evaluation_datalist(None, str(tmp_path), options([16, 16, 16]))
    assert "reusing" in caplog.text
    with caplog.at_level("WARNING"):
        (second,) = evaluation_datalist(None, str(tmp_path), options([20, 16, 16]))
    assert nib.load(second["image"]).shape == (20, 16, 16)
    assert "shape: [16, 16, 16] → [20, 16, 16]" in caplog.text and "simulating the evaluation set again" in caplog.text
    # the simulate workflow refuses an existing dataset and says whether its settings differ
    with pytest.raises(FileExistsError, match="with other settings.*shape"):
        write_dataset(str(tmp_path / "simulated"), **options([16, 16, 16]))


def test_weights_that_do_not_fit_stop_the_evaluation_before_its_set_is_simulated(tmp_path):
    from scripts.engines import GeneratorMatchesWeights
    from scripts.evaluation import evaluation_datalist
    from scripts.phantoms import RandomSourcePhantom
    from scripts.simulate import SimulationSet

    other = tmp_path / "other.pt"
    torch.save(QSMGenerator(features=(8, 8, 8, 8, 8, 4)).state_dict(), other)
    sets = {"random": SimulationSet(RandomSourcePhantom(), num_cases=1, snr=None, splits=[0, 0, 1])}
    check = GeneratorMatchesWeights(QSMGenerator(features=(4, 4, 8, 8, 8, 4)), str(other))
    with pytest.raises(ValueError, match="other.pt does not fit the network"):
        evaluation_datalist(None, str(tmp_path / "out"), {"sets": sets, "shape": [16, 16, 16]}, weights_check=check)
    assert not (tmp_path / "out").exists()


def test_inference_with_a_label_reports_the_network_alone_and_refined(tmp_path):
    """End to end (tiny generator): metrics.json and the log name both network results; the preview is written."""
    from conftest import infer, save_tiny_checkpoint, write_case

    fpath, mpath = write_case(tmp_path, "a")
    label = tmp_path / "a_chi.nii.gz"
    nib.save(nib.Nifti1Image(nib.load(fpath).get_fdata().astype(np.float32) * 3, np.eye(4)), label)
    items = [{"image": fpath.name, "mask": mpath.name, "label": label.name}]
    (tmp_path / "cases.json").write_text(json.dumps({"testing": items}))
    out = tmp_path / "out"
    # the support model: this noise "field" is no local field, and "auto" would (rightly) keep the network's map
    log = infer(
        save_tiny_checkpoint(tmp_path / "m.pt"),
        out,
        "--datalist",
        str(tmp_path / "cases.json"),
        "--dc_model",
        "support",
    )
    (record,) = json.loads((out / "metrics.json").read_text())
    assert list(record) == ["case", "network alone", "network + refinement", "tkd"]
    assert record["network + refinement"] != record["network alone"]  # two results, not one reported twice
    assert "network alone NRMSE" in log and "network + refinement NRMSE" in log
    assert (out / "a_field_chi.png").is_file()
