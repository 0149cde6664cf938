"""Equal-time table of training arms (issue 16): each arm's validation curve read at the same wall times.

Reads the ``train_results.json`` that ``bench/gpu/train_for.py`` writes for every arm (``bench/bench_recipes.sh``
puts them in ``OUT/<arm>/``) and prints a markdown table: per arm, the validation NRMSE (%) of the last validation
finished by each of the given wall times (minutes since the arm started, set-up included), the iterations trained by
then, the best NRMSE and when it came. Arms started together on the same machine share its load, so a row compares
what each recipe reached in the same time.

Usage::

    python bench/summarise_recipes.py --minutes 15 30 45 --arm baseline=/work/runs/q_base --arm dipole=/work/runs/q_dip
"""

from __future__ import annotations

import argparse
import json
import pathlib


def curve(results_dir: str) -> tuple[list[dict], dict]:
    """The validation records (elapsed_s, trained_iterations, val_nrmse, ...) and the whole results dict."""
    results = json.loads((pathlib.Path(results_dir) / "train_results.json").read_text())
    return results["validation"], results


def at(records: list[dict], seconds: float) -> dict | None:
    """The last validation finished by ``seconds`` of wall time."""
    done = [r for r in records if r["elapsed_s"] <= seconds]
    return done[-1] if done else None


def table(arms: dict[str, str], minutes: list[float]) -> str:
    head = "| arm | " + " | ".join(f"{m:g} min" for m in minutes) + " | best (iterations, min) | it/s steady |"
    rows = [head, "|" + "---|" * (len(minutes) + 3)]
    for name, folder in arms.items():
        records, results = curve(folder)
        cells = []
        for m in minutes:
            r = at(records, 60 * m)
            cells.append("—" if r is None else f"{r['val_nrmse']:.2f} ({r['trained_iterations']:,})")
        best = min(records, key=lambda r: r["val_nrmse"])
        cells.append(f"{best['val_nrmse']:.2f} ({best['trained_iterations']:,}, {best['elapsed_s'] / 60:.0f})")
        rate = results.get("it_per_s_steady")
        cells.append("—" if rate is None else f"{rate:.2f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", action="append", required=True, help="NAME=RESULTS_DIR (repeat)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[15, 30, 45])
    args = parser.parse_args()
    arms = {}
    for spec in args.arm:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--arm takes NAME=RESULTS_DIR, got {spec!r}")
        arms[name] = folder
    print(table(arms, args.minutes))


if __name__ == "__main__":
    main()
