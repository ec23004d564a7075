"""Loss curves against tokens seen, like the seed's palm_loss.png, for one run or several together.

    python -m nanopalm.plot out-a out-b --output compare.png
"""

from __future__ import annotations

import io
from pathlib import Path

from nanopalm.atomic import write_atomic
from nanopalm.errors import ArgumentParser, run_cli
from nanopalm.metrics import read_metrics


def plot_runs(run_dirs: list[str | Path], output: str | Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, run_dir in enumerate(run_dirs):
        rows = read_metrics(run_dir)
        label = labels[i] if labels else Path(run_dir).name
        train = [(r["tokens"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
        color = f"C{i}"  # one color a run: its train curve faint, its val points bold
        if train:
            ax.plot(*zip(*train, strict=True), color=color, alpha=0.35, label=f"{label} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, marker="o", label=f"{label} val")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    output = Path(output)
    image = io.BytesIO()
    fig.savefig(image, format=output.suffix.lstrip(".") or None, dpi=110)  # no suffix: PNG
    plt.close(fig)
    write_atomic(output, image.getvalue())  # a viewer never sees a half-written PNG
    return output


def main(argv: list[str]) -> None:
    parser = ArgumentParser(description="Plot the loss curves of one or more runs.")
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--output", default="loss.png", help="PNG to write")
    args = parser.parse_args(argv)
    print(plot_runs(args.runs, args.output))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
