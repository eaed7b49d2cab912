"""Draws docs/figures/pipeline.png, README's picture of the jobs and the actors they use.

    .venv/bin/python docs/figures/pipeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "pipeline.png"
JOB, DATA, ACTOR = "#dbe8f6", "#f4f4f4", "#fbe3cf"


def box(ax, x, y, w, h, title, lines=(), color=JOB, bold=True):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#555",
                                lw=1.0))
    ax.text(x + w / 2, y + h - 0.17, title, ha="center", va="top", fontsize=10.5,
            fontweight="bold" if bold else "normal", family="monospace" if not bold else None)
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.5 - 0.26 * i, line, ha="center", va="top", fontsize=8.2, color="#222")


def arrow(ax, start, end, text=""):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color="#444", lw=1.2))
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, text, ha="center", va="bottom", fontsize=7.8,
                color="#444", style="italic")


def main() -> None:
    fig, ax = plt.subplots(figsize=(13, 5.6))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 5.6)
    ax.axis("off")

    box(ax, 0.2, 3.35, 1.7, 1.1, "problems", ["reasoning-gym, JSONL,", "GSM8K / MATH / AIME"], DATA, bold=False)
    box(ax, 2.4, 3.1, 2.4, 1.6, "collect", ["the target writes", "step-by-step answers", "(target actor)"])
    box(ax, 5.3, 3.35, 1.7, 1.1, "trajectories", ["steps + token ids", "(JSONL)"], DATA, bold=False)
    box(ax, 7.5, 3.1, 2.5, 1.6, "sapo", ["draft: TRL warm start", "+ GRPO on SAPO rewards", "(Ray Train workers)"])
    box(ax, 10.5, 3.35, 2.3, 1.1, "trained draft", ["a model directory"], DATA, bold=False)

    box(ax, 0.2, 0.95, 1.7, 1.1, "MoE target", ["Mixtral / Qwen3-MoE", "(demo: SmolLM2 8x)"], DATA, bold=False)
    box(ax, 2.4, 0.7, 2.4, 1.6, "quantize", ["MiLo 3-bit + compensators", "CodeQuant 4-bit codebooks", "(Ray tasks)"])
    box(ax, 5.3, 0.95, 1.7, 1.1, "checkpoint", ["packed weights,", "manifest + hashes"], DATA, bold=False)
    box(ax, 7.5, 0.35, 2.5, 2.3, "evaluate / sweep", ["ar, sd, lr_sync, lr_async, fpsr", "(+sd) side by side;",
                                                       "sweep: a Ray Tune grid"])
    box(ax, 10.5, 0.95, 2.3, 1.1, "report + W&B", ["speedup, accept rates,", "theory vs measured"], DATA, bold=False)

    arrow(ax, (1.9, 3.9), (2.4, 3.9))
    arrow(ax, (4.8, 3.9), (5.3, 3.9))
    arrow(ax, (7.0, 3.9), (7.5, 3.9))
    arrow(ax, (10.0, 3.9), (10.5, 3.9))
    arrow(ax, (1.9, 1.5), (2.4, 1.5))
    arrow(ax, (4.8, 1.5), (5.3, 1.5))
    arrow(ax, (7.0, 1.5), (7.5, 1.5), "target")
    arrow(ax, (11.65, 3.35), (9.6, 2.65), "draft")
    arrow(ax, (10.0, 1.5), (10.5, 1.5))

    # the actors every evaluation runs on, inside its box
    for name, x in (("target", 7.62), ("draft", 8.42), ("verifier", 9.22)):
        ax.add_patch(FancyBboxPatch((x, 0.5), 0.66, 0.26, boxstyle="round,pad=0.01", fc=ACTOR, ec="#a66", lw=0.8))
        ax.text(x + 0.33, 0.63, name, ha="center", va="center", fontsize=8)
    ax.text(8.75, 0.95, "its Ray actors", ha="center", va="center", fontsize=7.8, color="#444")
    ax.text(6.5, 5.3, "SpecMoE: each box is a Ray job (python -m pipelines.<job>); artifacts pass between them",
            ha="center", va="center", fontsize=11)
    fig.savefig(OUT, dpi=100, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
