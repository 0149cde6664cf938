"""Gather the steps of bench/gpu/checks.sh into one JSON file.

Usage: python bench/gpu/summarise_checks.py WORK_DIR OUT_JSON START_EPOCH_S

Reads ``WORK_DIR/steps.tsv`` (name, status, exit status, seconds per step) and each step's log
``WORK_DIR/NAME.log``, and pulls the figures out of the logs: the environment (GPU, versions), pytest's counts and
failures, the demo's timing breakdown and metrics, the network-only inference benchmark, the training benchmark's
JSON and the torchrun smoke's backend. A step whose figures cannot be read keeps its status and log tail.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
import time

NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def tail(text: str, n: int = 25) -> list[str]:
    return text.splitlines()[-n:]


def parse_env(log: str) -> dict:
    for line in log.splitlines():
        if line.startswith("ENV "):
            return json.loads(line[4:])
    return {}


def parse_tests(log: str) -> dict:
    out: dict = {}
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line)]
    if summary:
        line = summary[-1]
        out["summary"] = line.strip("= ").strip()
        for key in ("passed", "failed", "skipped", "deselected", "error", "errors"):
            m = re.search(rf"(\d+) {key}\b", line)
            if m:
                out[key] = int(m.group(1))
    out["failures"] = [line for line in log.splitlines() if line.startswith(("FAILED", "ERROR"))][:20]
    out["skips"] = [line for line in log.splitlines() if line.startswith("SKIPPED")][:20]
    return out


def parse_demo(log: str, work: pathlib.Path) -> dict:
    out: dict = {}
    for line in log.splitlines():
        if line.startswith("TIMING "):
            out["timing_s"] = json.loads(line[7:])
        elif "network NRMSE" in line:
            out["case_report"] = line.split(" - ")[-1].strip()
    metrics = work / "demo" / "metrics.json"
    if metrics.is_file():
        out["metrics"] = json.loads(metrics.read_text())
    return out


def parse_infer(log: str) -> dict:
    out: dict = {"variants": {}}
    for line in log.splitlines():
        m = re.match(r"device (\S+), threads (\d+), volume \(([\d, ]+)\), mask fraction " + NUMBER, line)
        if m:
            out.update(
                device=m.group(1).rstrip(","),
                volume=[int(v) for v in m.group(3).split(",")],
                mask_fraction=float(m.group(4)),
            )
            continue
        m = re.match(r"reference \((.*)\): " + NUMBER + " s", line)
        if m:
            out["reference_s"] = float(m.group(2))
            continue
        m = re.match(r"windows: (\d+) in all", line)
        if m:
            out["windows"] = int(m.group(1))
            continue
        m = re.match(
            rf"(.+): {NUMBER} s, speed-up x{NUMBER}, max \|Δχ\| {NUMBER} ppm, relative L2 {NUMBER}",
            line,
        )
        if m:
            out["variants"][m.group(1)] = {
                "seconds": float(m.group(2)),
                "speed_up": float(m.group(3)),
                "max_abs_diff_ppm": float(m.group(4)),
                "relative_l2": float(m.group(5)),
            }
    return out


def parse_train(log: str) -> dict:
    out: dict = {}
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    if starts:
        try:
            out["stages"] = json.loads("\n".join(lines[starts[-1] :]))
        except json.JSONDecodeError:
            pass
    out["lines"] = [line for line in lines if line.startswith(("stage ", "brain pool"))]
    return out


def parse_ddp(log: str) -> dict:
    out: dict = {
        "reached_iteration_2": "Epoch: 1/1, Iter: 2/2" in log,
        "checkpoint_written": "checkpoint_epoch=1.pt" in log,
    }
    m = re.search(r"DDP backend (\S+) world (\d+) device (\S+)", log)
    if m:
        out.update(backend=m.group(1), world_size=int(m.group(2)), device=m.group(3))
    return out


PARSERS = {"env": parse_env, "tests": parse_tests, "infer_bench": parse_infer, "train_bench": parse_train}


def main() -> None:
    work, out_path, start = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
    result: dict = {"created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    rows = (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").is_file() else []
    for row in rows:
        name, status, rc, seconds = (row.split("\t") + ["", "", "", ""])[:4]
        entry: dict = {"status": status, "exit_status": int(rc) if rc.strip() else None, "seconds": float(seconds or 0)}
        log_path = work / f"{name}.log"
        log = log_path.read_text(errors="replace") if log_path.is_file() else ""
        if not log_path.is_file():
            result["steps"][name] = entry
            continue
        try:
            if name == "demo":
                entry.update(parse_demo(log, work))
            elif name == "ddp":
                entry.update(parse_ddp(log))
            elif name in PARSERS:
                entry.update(PARSERS[name](log))
        except Exception as e:  # a summary must still be written
            entry["parse_error"] = repr(e)
        if status != "ok" and log:
            entry["log_tail"] = tail(log, 40)
        result["steps"][name] = entry
    env = result["steps"].get("env", {})
    result["gpu_name"] = env.get("gpu_name")
    result["torch"] = env.get("torch")
    result["all_ok"] = all(s["status"] in ("ok", "not run (not in STEPS)") for s in result["steps"].values())
    result["wall_s"] = round(time.time() - start, 1)
    out_path.write_text(json.dumps(result, indent=2))
    print(f"gpu_checks: {'all steps ok' if result['all_ok'] else 'NOT all steps ok'}; GPU {result['gpu_name']}")
    for name, s in result["steps"].items():
        print(f"  {name:12s} {s['status']:24s} {s['seconds']:7.1f} s")


if __name__ == "__main__":
    main()
