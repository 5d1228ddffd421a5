"""Training curves of one or more runs, drawn from their metrics.jsonl into one PNG.

    python -m scaling.report WORKDIR [WORKDIR ...] [--out=curves.png]

Panels share the step axis: loss (training solid, each evaluation split dashed with markers),
accuracy when the runs log it, and throughput (tokens/s when every run logs it, else
examples/s). Each run has one colour and is labelled by its workdir's name, so runs that
differ in one setting compare at a glance. Needs matplotlib: `pip install 'scaling[report]'`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scaling.errors import UserError

PANEL_SIZE = (5.0, 4.0)  # inches per panel
DPI = 100
EXIT_USER_ERROR = 2


def load_runs(workdirs: list[str]) -> dict[str, list[dict]]:
    """Workdir label to its records; a missing or empty metrics.jsonl is a UserError."""
    from scaling.runtime.metrics import read_metrics

    runs = {}
    names = [Path(w).resolve().name for w in workdirs]
    for workdir, name in zip(workdirs, names, strict=True):
        path = Path(workdir) / "metrics.jsonl"
        if not path.is_file():
            raise UserError(f"{path}: no such file; pass workdirs of runs that have trained "
                            "(python -m scaling.main --workdir=...)")
        records = read_metrics(Path(workdir))  # a torn last line is skipped
        if not records and path.read_bytes().strip():
            raise UserError(f"{path}: not JSON lines (no line is a JSON object); is it a "
                            "metrics file?")
        if not records:
            raise UserError(f"{path}: holds no records yet; let the run log a step first")
        label = name if names.count(name) == 1 else str(workdir)
        runs[label] = records
    return runs


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in `split`, by step; the last record wins for a repeated step."""
    by_step = {r["step"]: r[key] for r in records if r.get("split") == split and key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def splits_of(records: list[dict]) -> list[str]:
    """"train" first, then the evaluation splits in the order they were first logged."""
    seen = dict.fromkeys(r.get("split") for r in records if "split" in r)
    return sorted(seen, key=lambda s: s != "train")


def throughput_key(runs: dict[str, list[dict]]) -> str:
    def logs(records, key):
        return any(key in r for r in records)

    if all(logs(records, "tokens_per_sec") for records in runs.values()):
        return "tokens_per_sec"
    return "examples_per_sec"


def plot_runs(runs: dict[str, list[dict]], out: Path) -> Path:
    """Draw every run into one figure of side-by-side panels and write it as a PNG."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("the report needs matplotlib: pip install 'scaling[report]'") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    speed = throughput_key(runs)
    panels = [("loss", "loss")]
    if any("accuracy" in r for records in runs.values() for r in records):
        panels.append(("accuracy", "accuracy"))
    panels.append((speed, speed.replace("_per_sec", "/s").replace("_", " ")))

    fig, axes = plt.subplots(1, len(panels), dpi=DPI, layout="constrained",
                             figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (label, records) in enumerate(runs.items()):
        colour = colours[index % len(colours)]
        for ax, (key, _) in zip(axes, panels, strict=True):
            for split in splits_of(records):
                if split != "train" and key == speed:
                    continue  # evaluation records carry no throughput
                steps, values = series(records, split, key)
                if not steps:
                    continue
                evaluation = split != "train"
                ax.plot(steps, values, color=colour, linestyle="--" if evaluation else "-",
                        marker="o" if evaluation else None, markersize=4,
                        label=f"{label} ({split})")
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == speed:
            ax.yaxis.set_major_formatter(lambda value, _: f"{value:,.0f}")
    axes[0].legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", metavar="WORKDIR")
    parser.add_argument("--out", type=Path, default=Path("curves.png"),
                        help="the PNG to write (default: curves.png here)")
    args = parser.parse_args(argv)
    try:
        written = plot_runs(load_runs(args.workdirs), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except OSError as e:
        print(f"error: --out={args.out}: cannot write there ({e.strerror})", file=sys.stderr,
              flush=True)
        return EXIT_USER_ERROR
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
