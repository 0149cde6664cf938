"""Where the inference pipeline's time goes, for the current default and the previous one, and how the maps differ.

A benchmark, not a test. For each case the real bundle inference workflow (``configs/inference.json``, MONAI's
:class:`~monai.bundle.ConfigWorkflow` with ``run_id="inference"``) runs in this process with the previous default
and with the current one, alternating (previous, current) in every repeat, with every transform of the parsed
``preprocessing`` and ``postprocessing`` Compose, the input checks (``cases``: :func:`scripts.checks.checked_cases`),
the demo's simulation, the inferer (the network: windows, stitching), the checkpoint loading and the case report
timed. The timers are grouped into stages:

* model setup: building the network (``network``) and loading its weights (``CheckpointLoader``);
* demo simulation: writing the demo's input (demo only: a user's case has its files);
* load: ``LoadImaged``, ``EnsureChannelFirstd``, ``EnsureTyped``;
* checks: ``checked_cases`` (settings, paths, every volume read and checked; the demo's simulation left out) and
  ``PrepareFieldd`` (units, non-finite values);
* background removal: ``BackgroundRemovald`` (nothing to do for a local field, the default);
* resampling: ``ToNetworkGridd`` (to the network's 1 mm grid, B0 along its third axis);
* network: the ``CropSlidingWindowInferer`` call (whole-volume input channels, windows, blending);
* inverse resampling: ``Invertd`` and ``InputFieldd`` (back to the input grid);
* refinement: ``DataConsistencyd``, its residual included (below it, the solve alone as the report records it);
* writing: ``SaveNiftid``, ``SavePreviewd``, ``SaveReportd`` and ``RunRecord`` (run_info.json, config_used.json);
* report: ``CaseReport`` (NRMSE/XSIM/HFEN and TKD against the truth; demo only: the other case has no label);
* other: the rest of the total (parsing, the evaluator's construction, collation, ``CopyItemsd``, masking);
* total: from the workflow's construction to the end of its run (imports excluded: they are done).

The median over ``--repeats`` is shown for each stage, in seconds, with the ratio current / previous. Before each
setting's runs, one untimed in-process run on a small 64³ case takes one-off costs (lazy imports, the first
convolutions' kernels) out of the first timed run. Then, unless ``--no_command_line``, each setting runs once per
repeat as a user runs it, ``python -m monai.bundle run inference --config_file configs/inference.json ...`` from
``bundle/`` in a subprocess, timed from the command to its exit (imports, model setup, demo simulation and writing
included: the figure a user sees), with the network, refinement (solve) and total figures of the log's
``StageTimes`` line (from loading to written outputs). Below the table: the windows the network ran (counted by a
forward hook) and the network's time per window.

Cases: ``demo``, inference.json's demo (160×192×160 1 mm brain, four microbleeds, known truth); ``brain``, a 1 mm
brain of 168×200×176 (:class:`scripts.phantoms.BrainPhantom`, seed 10001, SNR 40) simulated once in setup (not
timed) and given as files, ``--field F --mask M``, as a user would (its truth stays with the benchmark);
``resampled`` (not run unless named), the same for a brain of 144×176×144 voxels of 1.2 mm (seed 10003, the
held-out evaluation's grid), which the pipeline resamples onto the network's 1 mm grid and back.

Settings: ``previous`` is the default of commit e037a82 as far as a setting switches it: ``--sw_placement grid``
(the other changes since are in the code: the generator's finest decoder levels computed only where the crop keeps
them, even lengths for the real FFT's halved axis, a resampled field set to 0 beyond the mask's reach), so in
process the two settings run the same code, the tiles from the volume's first voxel against tiles fitted to the
mask (on ``resampled`` both the former: ``sw_placement_resampled``), unless ``--previous_tree DIR`` names a
checkout of the earlier commit (``git worktree add /tmp/prev e037a82``): then
``previous`` runs that tree's ``bundle/`` with its own defaults, on the command line only, alternating with the
current tree's runs, and the maps compared are the written ones (the network-alone χ is not written). ``current``
is ``configs/inference.json`` as it is. In process every run of ``previous`` (its warm-up first) comes before any run
of ``current`` (a rule from an earlier ``previous``, glibc's allocator setting, which holds for the rest of a
process); the command-line runs alternate. (Earlier ``previous`` settings: the default of commit 722c5f3,
``--dc_iterations 30``; of commit 9daa812, none
differing from the current one then; of commit ca6dda0,
``--keep_freed_memory False``; of commit ada0b9f, ``--dc_crop_to_mask False --fold_batchnorm False``; before commit
610001d the default before commit e3dcbfe: ``--dc_iterations 60 --dc_test_iterations 60 --dc_precond_weight null
--autocast False --sw_overlap 0``.)

Maps: both written χ NIfTIs of the first repeat are read back: max |Δχ| and RMS Δχ in the mask (ppm), the same for
the network alone (before the refinement, kept in memory from the in-process run), NRMSE (%) and XSIM of each
against the truth (:mod:`scripts.metrics`), the refinement record of each written report (model used, inconsistency
ratio, residual ratios) and, as a check that the in-process workflow is the user's, max |Δχ| between the in-process
and the command-line χ of the same setting.

Usage (from the repository root; on this repository's 2-core CPU, pinned to one core)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 taskset -c 1 python bench/bench_pipeline.py --threads 1 \\
        [--cases demo brain] [--repeats 1] [--no_command_line] [--no_warmup] [--keep DIR] [--previous_tree DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
CONFIG = BUNDLE / "configs" / "inference.json"
sys.path.insert(0, str(BUNDLE))

from scripts.data import simulate_case  # noqa: E402
from scripts.metrics import nrmse, xsim  # noqa: E402
from scripts.networks import bf16_supported  # noqa: E402
from scripts.phantoms import BrainPhantom, RandomSourcePhantom  # noqa: E402

#: The default of commit e037a82, as far as command-line overrides of inference.json switch it: tiles from the
#: volume's first voxel (fitted to the mask since; its whole decoder and odd FFT lengths are in the code: compare
#: with that commit through ``--previous_tree``).
PREVIOUS: dict[str, object] = {"sw_placement": "grid"}
SETTINGS: dict[str, dict[str, object]] = {"previous": PREVIOUS, "current": {}}

STAGES = (
    "model setup",
    "demo simulation",
    "load",
    "checks",
    "background removal",
    "resampling",
    "network",
    "inverse resampling",
    "refinement",
    "writing",
    "report",
    "other",
    "total",
)
#: Timer name → stage; timers not named here count as "other".
STAGE_OF = {
    "network build": "model setup",
    "CheckpointLoader": "model setup",
    "DemoCase": "demo simulation",
    "checked_cases": "checks",
    "LoadImaged": "load",
    "EnsureChannelFirstd": "load",
    "EnsureTyped": "load",
    "PrepareFieldd": "checks",
    "BackgroundRemovald": "background removal",
    "ToNetworkGridd": "resampling",
    "CropSlidingWindowInferer": "network",
    "Invertd": "inverse resampling",
    "InputFieldd": "inverse resampling",
    "DataConsistencyd": "refinement",
    "SaveNiftid": "writing",
    "SavePreviewd": "writing",
    "SaveReportd": "writing",
    "RunRecord": "writing",
    "CaseReport": "report",
}

#: The refinement record's entries shown, from each written ``*_report.json`` (``physics_check``).
REPORT_KEYS = (
    "dc_model_used",
    "inconsistency_ratio",
    "residual_ratio_support",
    "residual_ratio_shell",
    "residual_ratio",
    "residual_ratio_network",
    "dc_iterations",
    "dc_precond_weight",
    "dc_pad",
    "refinement_seconds",
)

BRAIN_SHAPE, BRAIN_SEED = (168, 200, 176), 10001
#: A brain on the held-out evaluation's grid (1.2 mm): the network sees it resampled onto 1 mm.
RESAMPLED_SHAPE, RESAMPLED_VOXEL, RESAMPLED_SEED = (144, 176, 144), (1.2, 1.2, 1.2), 10003
WARMUP_SHAPE, WARMUP_SEED = (64, 64, 64), 10002


@dataclass
class Case:
    """One benchmark case: the bundle overrides that select it, and where its truth and mask lie."""

    name: str
    description: str
    overrides: dict[str, str] = field(default_factory=dict)  # --field/--mask; none for the demo
    truth: str | None = None  # None: in the run's demo_input folder
    mask: str | None = None


@dataclass
class Run:
    """One in-process run: stage times, the written outputs and the network's χ before the refinement."""

    seconds: dict[str, float]
    output_dir: str
    network_chi: np.ndarray
    solve_seconds: float | None
    windows: int


class Timers:
    """Named wall-clock timers; :meth:`wrap` times a method of one object (its class swapped for a subclass)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, obj: object, methods: tuple[str, ...] = ("__call__",), name: str | None = None) -> None:
        """Time ``obj``'s ``methods`` under ``name`` (its class name by default). The subclass keeps the class name
        (MONAI's inverse checks it) and ``isinstance``; special methods are looked up on the class, hence no
        instance attribute."""
        base = type(obj)
        label = name or base.__name__
        timers = self

        def timed(method: str):
            original = getattr(base, method)

            def call(self, *args, **kwargs):
                with timers(label):
                    return original(self, *args, **kwargs)

            return call

        obj.__class__ = type(base.__name__, (base,), {m: timed(m) for m in methods})

    def stages(self, total: float) -> dict[str, float]:
        out = dict.fromkeys(STAGES, 0.0)
        for name, seconds in self.seconds.items():
            out[STAGE_OF.get(name, "other")] += seconds
        out["checks"] -= out["demo simulation"]  # checked_cases calls the demo
        out["other"] += total - sum(out.values())
        out["total"] = total
        return out


def cli_value(value: object) -> str:
    """A value as the ``monai.bundle run`` command line takes it (fire: ``False``/``True`` literals, ``null``)."""
    return "null" if value is None else str(value)


def run_in_process(case: Case, setting: dict[str, object], output_dir: str) -> Run:
    """Run the bundle's inference workflow for ``case`` with ``setting`` in this process, every stage timed."""
    timers = Timers()
    start = time.perf_counter()
    workflow = ConfigWorkflow(
        config_file=str(CONFIG),
        logging_file=False,
        workflow_type="infer",
        run_id="inference",
        bundle_root=str(BUNDLE),
        output_dir=output_dir,
        **{"inferer#progress": False},
        **case.overrides,
        **setting,
    )
    workflow.initialize()
    parser = workflow.parser
    timers.wrap(parser.get_parsed_content("demo_case"))
    with timers("network build"):
        network = parser.get_parsed_content("network")
    windows = [0]
    hook = network.register_forward_hook(lambda module, args, output: windows.__setitem__(0, windows[0] + len(output)))
    with timers("checked_cases"):
        parser.get_parsed_content("cases")
    for compose in ("preprocessing", "postprocessing"):
        for transform in parser.get_parsed_content(compose).transforms:
            timers.wrap(transform)
    timers.wrap(parser.get_parsed_content("inferer"))
    for handler in parser.get_parsed_content("base_handlers"):
        if type(handler).__name__ in STAGE_OF:
            timers.wrap(handler)
    for handler in parser.get_parsed_content("report_handlers"):
        timers.wrap(handler, ("report", "completed"))
    workflow.run()
    workflow.finalize()
    total = time.perf_counter() - start
    hook.remove()
    outputs = parser.get_parsed_content("evaluator").state.output
    item = outputs[0] if isinstance(outputs, list) else outputs
    network_chi = torch.as_tensor(item["pred_network"]).detach().cpu().float()[0].numpy()
    del workflow, parser, outputs, item, network
    gc.collect()
    solve = refinement_record(output_dir).get("refinement_seconds")
    return Run(timers.stages(total), output_dir, network_chi, solve, windows[0])


def run_command_line(
    case: Case, setting: dict[str, object], output_dir: str, threads: int | None, bundle: pathlib.Path = BUNDLE
) -> float:
    """Run ``python -m monai.bundle run inference`` from ``bundle`` (this tree's by default) in a subprocess; its wall
    time (s)."""
    command = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json"]
    command += ["--output_dir", output_dir]
    for key, value in {**case.overrides, **setting}.items():
        command += [f"--{key}", cli_value(value)]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log = pathlib.Path(output_dir + ".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=bundle, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
    return seconds


def log_stage_times(output_dir: str) -> dict[str, float]:
    """The figures of the ``StageTimes`` line in a command-line run's log: ``network``, ``refinement`` (the solve)
    and ``total`` (from loading to the end of writing: no imports, model setup, demo simulation, checks or
    report), in seconds; empty when the line is missing."""
    lines = [ln for ln in pathlib.Path(output_dir + ".log").read_text().splitlines() if "StageTimes" in ln]
    out = {}
    for name, pattern in (("network", r"\| network ([0-9.]+) s"), ("refinement", r"\(refinement ([0-9.]+) s\)"),
                          ("total", r"\| total ([0-9.]+) s")):
        found = re.search(pattern, lines[-1]) if lines else None
        if found:
            out[name] = float(found.group(1))
    return out


def written(output_dir: str, suffix: str) -> pathlib.Path:
    """The one ``*{suffix}`` output of a run (``_chi.nii.gz``, ``_report.json``)."""
    paths = sorted(pathlib.Path(output_dir).glob(f"*{suffix}"))
    if len(paths) != 1:
        raise RuntimeError(f"expected one *{suffix} in {output_dir}, found {[p.name for p in paths]}")
    return paths[0]


def refinement_record(output_dir: str) -> dict:
    return json.loads(written(output_dir, "_report.json").read_text()).get("physics_check", {})


def read(path: str | pathlib.Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def simulate_to_files(
    phantom,
    shape: tuple[int, ...],
    seed: int,
    folder: pathlib.Path,
    stem: str,
    voxel: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> Case:
    """Simulate a case (SNR 40, ``voxel`` mm) and write its field, mask and truth as a user's NIfTI files."""
    case = simulate_case(phantom, shape, voxel, snr=40.0, seed=seed)
    affine = case["affine"].numpy()  # scripts.data.scanner_affine: B0 along world z
    paths = {}
    for key, name in (("field", "field"), ("mask", "mask"), ("chi", "chi_truth")):
        paths[key] = str(folder / f"{stem}_{name}.nii.gz")
        nib.save(nib.Nifti1Image(case[key].numpy().astype(np.float32), affine), paths[key])
    return Case(
        stem,
        f"{'×'.join(map(str, shape))} {'×'.join(f'{v:g}' for v in voxel)} mm, seed {seed}, SNR 40, given as "
        "--field/--mask",
        {"field": paths["field"], "mask": paths["mask"]},
        paths["chi"],
        paths["mask"],
    )


def cpu_report() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Model name")), "?")
    except (OSError, subprocess.CalledProcessError):
        model = "unknown (no lscpu)"
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    present = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("amx_bf16", "amx_tile", "avx512_bf16"))
    auto = "bf16" if bf16_supported("cpu") else "float32"
    return f"CPU: {model}; flags: {present} → autocast 'auto' runs the network in {auto}"


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def print_table(
    case: Case, runs: dict[str, list[Run]], cli: dict[str, list[float]], logs: dict[str, list[dict[str, float]]]
) -> None:
    repeats = len(runs["current"])
    print(f"\n== {case.name}: {case.description}; seconds, median of {repeats} in-process run(s)")
    print(f"{'stage':<34}{'previous':>10}{'current':>10}{'ratio':>8}")

    def row(label: str, old: float | None, new: float | None) -> None:  # previous None: not run in process
        if new is None:
            return
        ratio = f"{new / old:8.2f}" if old is not None and old >= 0.005 else f"{'-':>8}"
        print(f"{label:<34}{'-' if old is None else f'{old:.2f}':>10}{new:10.2f}{ratio}")

    medians = {
        s: {k: statistics.median(r.seconds[k] for r in rs) if rs else None for k in STAGES} for s, rs in runs.items()
    }
    for stage in STAGES:
        if stage == "total":
            print("-" * 62)
        row(stage, medians["previous"][stage], medians["current"][stage])
        if stage == "refinement":
            solves = {s: [r.solve_seconds for r in rs if r.solve_seconds is not None] for s, rs in runs.items()}
            if solves["current"]:
                row("  of which the solve (report)", *(statistics.median(v) if v else None for v in solves.values()))
    if all(cli.values()):
        row("command line, wall (median)", *(statistics.median(cli[s]) for s in SETTINGS))
        for name in ("network", "refinement", "total"):
            if all(name in log for s in SETTINGS for log in logs[s]):
                medians_log = (statistics.median(log[name] for log in logs[s]) for s in SETTINGS)
                row(f"  its log's StageTimes {name}", *medians_log)
    windows = {s: statistics.median(r.windows for r in rs) for s, rs in runs.items() if rs}
    each = {s: medians[s]["network"] / max(windows[s], 1) for s in windows}
    print("network windows run: " + ", ".join(f"{s} {windows[s]:g} ({each[s]:.3f} s each)" for s in windows))


def print_maps(case: Case, runs: dict[str, list[Run]], cli_dirs: dict[str, str | None]) -> None:
    """The maps' difference and scores; a setting run on the command line only (``--previous_tree``) is read from
    its command-line output (its network-alone χ is not written, so only the refined maps are compared)."""
    folders = {s: rs[0].output_dir if rs else cli_dirs[s] for s, rs in runs.items()}
    if None in folders.values():
        print(f"maps of {case.name}: not compared (a setting has no written χ)")
        return
    folder = folders["current"]
    truth = read(case.truth or os.path.join(folder, "demo_input", "chi_truth.nii.gz"))
    mask = read(case.mask or os.path.join(folder, "demo_input", "mask.nii.gz")) > 0
    truth_t, mask_t = torch.from_numpy(truth), torch.from_numpy(mask)
    chi = {s: read(written(d, "_chi.nii.gz")) for s, d in folders.items()}
    compared = [("network + refinement", chi)]
    if all(runs.values()):
        compared.append(("network alone", {s: rs[0].network_chi for s, rs in runs.items()}))
    print(f"maps of {case.name} (first repeat; current − previous, ppm; NRMSE/XSIM against the truth, in the mask):")
    for label, maps in compared:
        delta = maps["current"] - maps["previous"]
        rms = float(np.sqrt(np.mean(delta[mask].astype(np.float64) ** 2)))
        scores = ", ".join(
            f"{s} {nrmse(torch.from_numpy(maps[s]), truth_t, mask_t):.2f} % / "
            f"{xsim(torch.from_numpy(maps[s]), truth_t, mask_t):.3f}"
            for s in SETTINGS
        )
        print(f"  {label}: max |Δχ| {np.abs(delta).max():.4f}, RMS Δχ {rms:.4f}; NRMSE / XSIM {scores}")
    for setting, directory in folders.items():
        record = refinement_record(directory)
        keys = [k for k in REPORT_KEYS if k in record]
        shown = (f"{k} {record[k]:.4g}" if isinstance(record[k], float) else f"{k} {record[k]}" for k in keys)
        print(f"  report, {setting}: " + ", ".join(shown))
    for setting, directory in cli_dirs.items():
        if directory is not None and runs[setting]:
            diff = np.abs(read(written(directory, "_chi.nii.gz")) - chi[setting]).max()
            print(f"  command line vs in-process, {setting}: max |Δχ| {diff:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=("demo", "brain", "resampled"), default=["demo", "brain"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (also the subprocesses' OMP)")
    parser.add_argument("--no_command_line", action="store_true", help="skip the subprocess runs")
    parser.add_argument("--no_warmup", action="store_true", help="skip the untimed warm-up runs")
    parser.add_argument("--keep", default=None, help="write outputs here and keep them (default: a temp dir)")
    parser.add_argument(
        "--previous_tree",
        default=None,
        help="a checkout of an earlier commit (git worktree add DIR COMMIT): 'previous' runs its bundle/ on the "
        "command line only, with its own defaults",
    )
    args = parser.parse_args()
    previous_bundle = BUNDLE
    if args.previous_tree:
        previous_bundle = pathlib.Path(args.previous_tree).resolve() / "bundle"
        if not (previous_bundle / "configs" / "inference.json").is_file():
            parser.error(f"--previous_tree {args.previous_tree}: no bundle/configs/inference.json there")
        if args.no_command_line:
            parser.error("--previous_tree runs the previous tree on the command line only: drop --no_command_line")
        SETTINGS["previous"] = {}  # that tree's own defaults
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("monai.bundle.workflows").setLevel(logging.ERROR)  # "skipping logging" on every run

    import monai

    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(cpu_report())
    print(
        f"torch {torch.__version__}, MONAI {monai.__version__}, {torch.get_num_threads()} torch thread(s) "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), CPUs {affinity}; "
        f"load average at start {load_average()}"
    )
    defaults = ConfigParser.load_config_file(str(CONFIG))
    for name, setting in SETTINGS.items():
        if name == "previous" and args.previous_tree:
            print(f"previous: the defaults of {previous_bundle.parent} (command line only)")
            continue
        values = {k: setting.get(k, defaults[k]) for k in PREVIOUS}
        print(f"{name}: " + ", ".join(f"{k} {cli_value(v)}" for k, v in values.items()))

    root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        inputs = root / "inputs"
        inputs.mkdir(exist_ok=True)
        cases = {"demo": Case("demo", "inference.json's demo, 160×192×160 1 mm brain, 4 microbleeds, truth known")}
        if "brain" in args.cases:
            cases["brain"] = simulate_to_files(BrainPhantom(), BRAIN_SHAPE, BRAIN_SEED, inputs, "brain")
        if "resampled" in args.cases:
            cases["resampled"] = simulate_to_files(
                BrainPhantom(), RESAMPLED_SHAPE, RESAMPLED_SEED, inputs, "resampled", RESAMPLED_VOXEL
            )
        warmup = None if args.no_warmup else simulate_to_files(
            RandomSourcePhantom(), WARMUP_SHAPE, WARMUP_SEED, inputs, "warmup"
        )
        print(f"setup (simulations, not timed): {time.perf_counter() - start:.1f} s")
        # In process, every run of "previous" comes before any run of "current" (so that a setting which changes the
        # process for good, as keep_freed_memory's allocator did, cannot leak into the other; the command-line runs
        # are processes of their own and alternate).
        runs: dict[str, dict[str, list[Run]]] = {c: {s: [] for s in SETTINGS} for c in args.cases}
        for name, setting in SETTINGS.items():
            if name == "previous" and args.previous_tree:
                continue
            if warmup is not None:
                start = time.perf_counter()
                run_in_process(warmup, setting, str(root / f"warmup_{name}"))
                shape = "×".join(map(str, WARMUP_SHAPE))
                print(f"warm-up of {name} ({shape} random sources): {time.perf_counter() - start:.1f} s")
            for case_name in args.cases:
                for repeat in range(args.repeats):
                    run = run_in_process(cases[case_name], setting, str(root / f"{case_name}_{name}_{repeat}"))
                    runs[case_name][name].append(run)
                    print(f"  {case_name} {name} in-process #{repeat}: {run.seconds['total']:.1f} s", flush=True)

        for case_name in args.cases:
            case = cases[case_name]
            cli: dict[str, list[float]] = {s: [] for s in SETTINGS}
            logs: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
            cli_dirs: dict[str, str | None] = dict.fromkeys(SETTINGS)
            for repeat in range(0 if args.no_command_line else args.repeats):
                for name, setting in SETTINGS.items():
                    directory = str(root / f"{case_name}_{name}_{repeat}_cli")
                    bundle = previous_bundle if name == "previous" else BUNDLE
                    cli[name].append(run_command_line(case, setting, directory, args.threads, bundle))
                    logs[name].append(log_stage_times(directory))
                    cli_dirs[name] = cli_dirs[name] or directory
                    print(f"  {case_name} {name} command line #{repeat}: {cli[name][-1]:.1f} s", flush=True)
            print_table(case, runs[case_name], cli, logs)
            print_maps(case, runs[case_name], cli_dirs)
        print(f"\nload average at the end {load_average()}")
    finally:
        if args.keep:
            print(f"outputs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
