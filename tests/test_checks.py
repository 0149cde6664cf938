"""Input checks (scripts.checks): every bad input is refused before anything is written, with a message naming it."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE, SHAPE, infer, save_tiny_checkpoint, write_case

from scripts.checks import FieldSettings, InputError, checked_cases, inference_datalist


def check(out, dc_weight=3e-4, **kwargs):
    """``checked_cases`` as ``inference.json`` calls it; returns the items or the refusal message."""
    try:
        return checked_cases(output_dir=str(out), dc_weight=dc_weight, **kwargs)
    except SystemExit as e:
        return str(e)


def assert_refused(message, out, *fragments):
    """A refusal with every fragment, and nothing written into ``out``."""
    assert isinstance(message, str), message
    assert "stopped before writing anything" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_refusal_through_the_command_line(tmp_path):
    """The command stops with a non-zero exit status, the message, and nothing written."""
    out = tmp_path / "out"
    missing = tmp_path / "nope_field.nii.gz"
    result = infer(save_tiny_checkpoint(tmp_path / "m.pt"), out, "--field", str(missing), expect_ok=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert_refused(text, out, str(missing), "field file not found")


def test_weights_that_do_not_fit_stop_the_demo_before_it_writes_its_input(tmp_path):
    """The demo simulates and writes its input only once the weights are known to fit the generator."""
    import torch

    from scripts.networks import QSMGenerator

    other = tmp_path / "other.pt"
    torch.save(QSMGenerator(features=(8, 8, 8, 8, 8, 4)).state_dict(), other)  # the run builds (4, 4, 8, 8, 8, 4)
    out = tmp_path / "out"
    result = infer(other, out, expect_ok=False)
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert_refused(text, out, f"{other} does not fit the network")


def test_unreadable_file_is_refused(tmp_path):
    bad = tmp_path / "broken_field.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file" * 10)
    out = tmp_path / "out"
    assert_refused(check(out, field=str(bad)), out, str(bad), "cannot read the field")


def test_multi_echo_4d_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "me_field.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 0.03, (*SHAPE, 4)).astype(np.float32), np.eye(4)), path)
    out = tmp_path / "out"
    assert_refused(check(out, field=str(path)), out, str(path), "4D", "multi-echo", "combine the echoes")


def test_nonfinite_is_refused(tmp_path):
    field = np.random.default_rng(1).normal(0, 0.03, SHAPE).astype(np.float32)
    field[10, 10, 8] = np.nan
    field[11, 10, 8] = np.inf
    fpath, mpath = write_case(tmp_path, "nan", field=field)
    out = tmp_path / "out"
    message = check(out, field=str(fpath), mask=str(mpath))
    assert_refused(message, out, str(fpath), "2 voxels are NaN or infinite", "--nonfinite mask")


def test_nonfinite_masked_with_the_flag(tmp_path):
    """End to end: NaN voxels are zeroed, left out of the mask, and counted in the report."""
    field = np.random.default_rng(1).normal(0, 0.03, SHAPE).astype(np.float32)
    field[10, 10, 8] = np.nan
    fpath, mpath = write_case(tmp_path, "nan", field=field)
    out = tmp_path / "out"
    checkpoint = save_tiny_checkpoint(tmp_path / "m.pt")
    log = infer(checkpoint, out, "--field", str(fpath), "--mask", str(mpath), "--nonfinite", "mask")
    assert "1 NaN/Inf voxels are set to 0 and left out of the mask" in log
    chi = nib.load(out / "nan_field_chi.nii.gz").get_fdata()
    assert chi[10, 10, 8] == 0 and np.all(np.isfinite(chi))
    report = json.loads((out / "nan_field_report.json").read_text())
    assert report["nonfinite_voxels_masked"] == 1


def test_mask_shape_mismatch_is_refused(tmp_path):
    fpath, _ = write_case(tmp_path, "a")
    _, mpath = write_case(tmp_path, "b", shape=(24, 20, 15))
    out = tmp_path / "out"
    message = check(out, field=str(fpath), mask=str(mpath))
    assert_refused(message, out, str(mpath), "mask shape (24, 20, 15) differs from the field's (24, 20, 16)")


def test_mask_affine_mismatch_is_refused(tmp_path):
    fpath, _ = write_case(tmp_path, "a")
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    _, mpath = write_case(tmp_path, "b", affine=shifted)
    out = tmp_path / "out"
    assert_refused(check(out, field=str(fpath), mask=str(mpath)), out, str(mpath), "mask affine differs")


def test_empty_mask_is_refused(tmp_path):
    fpath, mpath = write_case(tmp_path, "a", mask=np.zeros(SHAPE, dtype=np.uint8), field=np.ones(SHAPE) * 0.01)
    out = tmp_path / "out"
    assert_refused(check(out, field=str(fpath), mask=str(mpath)), out, str(mpath), "the mask is empty")


def test_values_implausible_for_the_unit_are_refused(tmp_path):
    hz = np.random.default_rng(2).normal(0, 0.03, SHAPE).astype(np.float32) * 127.7  # a field in Hz (3 T)
    fpath, mpath = write_case(tmp_path, "hz", field=hz)
    out = tmp_path / "out"
    message = check(out, field=str(fpath), mask=str(mpath))
    assert_refused(
        message, out, str(fpath), "implausible for a local field in field_unit 'ppm'", "--field_unit hz --b0_tesla 3"
    )
    # the same values, stated as Hz at 3 T, pass
    assert check(out, field=str(fpath), mask=str(mpath), field_unit="hz", b0_tesla=3) == [
        {"image": str(fpath), "mask": str(mpath)}
    ]


def test_unwritable_output_directory_is_refused(tmp_path):
    fpath, mpath = write_case(tmp_path, "a")
    blocker = tmp_path / "a_file"
    blocker.write_text("a file, not a directory")
    out = blocker / "out"
    assert_refused(check(out, field=str(fpath), mask=str(mpath)), out, str(out), "not writable")
    assert blocker.read_text() == "a file, not a directory"


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    fpath, mpath = write_case(tmp_path, "a")
    out = tmp_path / "out"
    out.mkdir()
    old = out / "a_field_chi.nii.gz"
    old.write_bytes(b"earlier result")
    message = check(out, field=str(fpath), mask=str(mpath))
    assert "already exists" in message and "--overwrite true" in message, message
    assert old.read_bytes() == b"earlier result" and sorted(p.name for p in out.iterdir()) == [old.name]
    infer(
        save_tiny_checkpoint(tmp_path / "m.pt"), out, "--field", str(fpath), "--mask", str(mpath), "--overwrite", "true"
    )
    assert nib.load(old).shape == SHAPE
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_one_bad_case_stops_the_whole_datalist(tmp_path):
    write_case(tmp_path, "good")
    write_case(tmp_path, "bad", field=np.full(SHAPE, np.nan, dtype=np.float32))
    items = [{"image": f"{n}_field.nii.gz", "mask": f"{n}_mask.nii.gz"} for n in ("good", "bad")]
    (tmp_path / "cases.json").write_text(json.dumps({"testing": items}))
    out = tmp_path / "out"
    message = check(out, datalist=str(tmp_path / "cases.json"))
    assert_refused(message, out, "bad_field.nii.gz", "NaN or infinite")
    assert "good_field" not in message.replace("bad_field", "")


def test_settings_are_checked(tmp_path):
    with pytest.raises(InputError, match="needs b0_tesla"):
        FieldSettings.parse("hz")
    with pytest.raises(InputError, match="needs echo_time"):
        FieldSettings.parse("rad", b0_tesla=3)
    with pytest.raises(InputError, match="looks like milliseconds"):
        FieldSettings.parse("rad", b0_tesla=3, echo_time=20)
    with pytest.raises(InputError, match="field_unit must be one of"):
        FieldSettings.parse("gauss")
    s = FieldSettings.parse("rad", b0_tesla="3", echo_time="0.02", nonfinite="mask", check_values="false")
    assert s.check_values is False and math.isclose(s.ppm_per_unit, 1 / (2 * math.pi * 42.576 * 3 * 0.02))
    fpath, _ = write_case(tmp_path, "a")
    message = check(tmp_path / "out", field=str(fpath), dc_weight=-1, voxel_size=[1, 0, 1], overwrite="maybe")
    assert "dc_weight must be > 0" in message and "voxel_size must be positive" in message and "overwrite" in message


def test_inference_datalist_and_the_demo_component(tmp_path):
    (tmp_path / "a.nii.gz").write_bytes(b"")
    listing = {"testing": [{"image": "a.nii.gz", "mask": "m.nii.gz"}, "b.nii.gz"]}
    path = tmp_path / "list.json"
    path.write_text(json.dumps(listing))
    items = inference_datalist(datalist=str(path))
    assert items[0] == {"image": str(tmp_path / "a.nii.gz"), "mask": str(tmp_path / "m.nii.gz")}
    assert items[1] == {"image": str(tmp_path / "b.nii.gz")}
    with pytest.raises(ValueError, match="not both"):
        inference_datalist(field="x.nii.gz", datalist=str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inference_datalist(datalist=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no input"):
        inference_datalist()
    # without --field or --datalist the demo component is called for the one case, and only then
    fpath, mpath = write_case(tmp_path, "demo")
    calls = []

    def demo():
        calls.append(1)
        return {"image": str(fpath), "mask": str(mpath)}

    assert inference_datalist(demo=demo) == [{"image": str(fpath), "mask": str(mpath)}] and calls == [1]
    assert inference_datalist(field=str(fpath), demo=demo) == [{"image": str(fpath)}] and calls == [1]
    assert check(tmp_path / "out", demo=demo) == [{"image": str(fpath), "mask": str(mpath)}]


# ------------------------------------------------------------------------------------------ issue 14


def write_label(folder, name, shape=SHAPE):
    path = folder / f"{name}_chi.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(5).normal(0, 0.05, shape).astype(np.float32), np.eye(4)), path)
    return path


def test_damaged_label_is_refused_before_anything_is_written(tmp_path):
    """A truncated label (.nii.gz) is read during the checks: refused with its name, not a crash in LoadImaged."""
    write_case(tmp_path, "a")
    label = write_label(tmp_path, "a")
    data = label.read_bytes()
    label.write_bytes(data[: len(data) // 2])  # the header survives, the data is cut
    listing = tmp_path / "cases.json"
    listing.write_text(
        json.dumps({"testing": [{"image": "a_field.nii.gz", "mask": "a_mask.nii.gz", "label": label.name}]})
    )
    out = tmp_path / "out"
    assert_refused(
        check(out, datalist=str(listing)), out, str(label), "cannot read the label (true χ) data", "truncated"
    )


def test_local_field_in_hz_at_1p5_tesla_is_refused_with_the_likely_unit(tmp_path):
    """p99 ≈ 3.3: inside the old [0.001, 5] ppm window, implausible for a local field in ppm (χ would be 64× off)."""
    hz = np.random.default_rng(3).normal(0, 0.02, SHAPE).astype(np.float32) * 63.87  # 0.02 ppm local field, 1.5 T
    fpath, mpath = write_case(tmp_path, "hz15", field=hz)
    out = tmp_path / "out"
    message = check(out, field=str(fpath), mask=str(mpath))
    assert_refused(
        message,
        out,
        str(fpath),
        "implausible for a local field",
        "expected 0.003–1 ppm",
        "in Hz at 1.5 T",
        "--field_unit hz --b0_tesla 1.5",
        "--field_kind total",
    )
    item = [{"image": str(fpath), "mask": str(mpath)}]
    assert check(out, field=str(fpath), mask=str(mpath), field_unit="hz", b0_tesla=1.5) == item
    # a total field of a few ppm is plausible as such, and a tiny one is not
    assert check(out, field=str(fpath), mask=str(mpath), field_kind="total") == item
    message = check(out, field=str(fpath), mask=str(mpath), field_kind="total", field_unit="hz", b0_tesla=3)
    assert_refused(message, out, "implausibly small for a total field", "expected 0.03–30 ppm")


def test_field_kind_is_validated_and_reaches_the_transforms(tmp_path):
    from monai.bundle import ConfigParser

    from scripts.grid import PrepareFieldd

    fpath, mpath = write_case(tmp_path, "a")
    out = tmp_path / "out"
    assert_refused(check(out, field=str(fpath), field_kind="background"), out, "field_kind must be one of local, total")
    assert FieldSettings.parse(field_kind=" Total ").field_kind == "total"
    assert PrepareFieldd(field_kind="total").settings.field_kind == "total"
    config = ConfigParser.load_config_file(str(BUNDLE / "configs" / "inference.json"))
    assert config["field_kind"] == "local" and config["cases"]["field_kind"] == "@field_kind"
    prepare = [t for t in config["preprocessing"]["transforms"] if t["_target_"].endswith("PrepareFieldd")]
    assert prepare[0]["field_kind"] == "@field_kind"


def test_settings_problems_and_missing_files_are_reported_together_before_any_volume_is_read(tmp_path, monkeypatch):
    out = tmp_path / "out"
    missing = tmp_path / "nonexistent_field.nii.gz"
    message = check(out, field=str(missing), field_unit="hz")
    assert_refused(message, out, "needs b0_tesla", str(missing), "field file not found", "2 problem(s)")
    # a missing mask beside an existing field: refused without opening the field
    fpath, _ = write_case(tmp_path, "a")
    opened = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda *a, **k: opened.append(a) or real_load(*a, **k))
    message = check(out, field=str(fpath), mask=str(tmp_path / "no_mask.nii.gz"), dc_weight=0)
    assert_refused(message, out, "no_mask.nii.gz: mask file not found", "dc_weight must be > 0")
    assert opened == []


def test_demo_rerun_is_refused_before_the_demo_input_is_written(tmp_path):
    from scripts.demo import DemoCase

    out = tmp_path / "out"
    out.mkdir()
    (out / "field_chi.nii.gz").write_bytes(b"earlier result")
    message = check(out, demo=DemoCase(str(out), seed=0, shape=(32, 32, 32)))
    assert "already exists" in message and "--overwrite true" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["field_chi.nii.gz"]


def test_complex_field_is_refused(tmp_path):
    path = tmp_path / "cplx_field.nii.gz"
    data = (np.ones(SHAPE) + 1j * np.ones(SHAPE)).astype(np.complex64)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    out = tmp_path / "out"
    assert_refused(check(out, field=str(path)), out, str(path), "holds complex values")


def test_two_inputs_with_the_same_name_are_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_case(tmp_path / "x", "a")
    write_case(tmp_path / "y", "a")
    items = [{"image": f"{d}/a_field.nii.gz", "mask": f"{d}/a_mask.nii.gz"} for d in ("x", "y")]
    (tmp_path / "cases.json").write_text(json.dumps({"testing": items}))
    out = tmp_path / "out"
    assert_refused(check(out, datalist=str(tmp_path / "cases.json")), out, "would both write a_field_chi.nii.gz")


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"dc_weight": 0}, "dc_weight must be > 0"),
        ({"dc_weight": -1e-3}, "dc_weight must be > 0"),
        ({"dc_weight": "abc"}, "dc_weight must be a number"),
        ({"voxel_size": "[1, 1]"}, "voxel_size must be 3 finite numbers"),
        ({"voxel_size": "one"}, "voxel_size must be 3 numbers"),
        ({"voxel_size": [1, -1, 1]}, "voxel_size must be positive"),
        ({"b0_direction": [0, 0, 0]}, "b0_direction must not be the zero vector"),
        ({"b0_direction": "[0, 0, nan]"}, "b0_direction must be 3"),
        ({"check_values": "sometimes"}, "check_values must be true or false"),
    ],
)
def test_malformed_settings_are_refused(tmp_path, settings, fragment):
    fpath, mpath = write_case(tmp_path, "a")
    out = tmp_path / "out"
    assert_refused(check(out, field=str(fpath), mask=str(mpath), **settings), out, fragment)


def test_zero_field_without_a_mask_is_refused(tmp_path):
    fpath, _ = write_case(tmp_path, "zero", field=np.zeros(SHAPE, np.float32))
    out = tmp_path / "out"
    assert_refused(check(out, field=str(fpath)), out, str(fpath), "zero everywhere and no mask was given")


def test_check_values_false_skips_the_plausibility_check(tmp_path):
    hz = np.random.default_rng(2).normal(0, 0.03, SHAPE).astype(np.float32) * 127.7
    fpath, mpath = write_case(tmp_path, "hz", field=hz)
    out = tmp_path / "out"
    assert_refused(check(out, field=str(fpath), mask=str(mpath)), out, "implausible")
    assert check(out, field=str(fpath), mask=str(mpath), check_values="false") == [
        {"image": str(fpath), "mask": str(mpath)}
    ]


def test_directory_given_as_a_file_is_refused(tmp_path):
    (tmp_path / "a_field.nii.gz").mkdir()
    out = tmp_path / "out"
    assert_refused(check(out, field=str(tmp_path / "a_field.nii.gz")), out, "field is a directory, not an image file")


def test_mask_covering_only_nan_voxels_and_a_constant_field_are_refused(tmp_path):
    field = np.full(SHAPE, 0.02, np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:8, 5:8, 5:8] = 1
    field[5:8, 5:8, 5:8] = np.nan
    fpath, mpath = write_case(tmp_path, "nanmask", field=field, mask=mask)
    out = tmp_path / "out"
    message = check(out, field=str(fpath), mask=str(mpath), nonfinite="mask")
    assert_refused(message, out, str(mpath), "the mask covers only NaN/Inf voxels")
    fpath, mpath = write_case(tmp_path, "const", field=np.full(SHAPE, 0.02, np.float32))
    assert_refused(check(out, field=str(fpath), mask=str(mpath)), out, "the field is constant inside the mask")
