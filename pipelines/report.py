"""Reports: markdown tables and PNG plots of an evaluation summary."""

from __future__ import annotations

from pathlib import Path


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def method_table(summaries: dict[str, dict]) -> list[str]:
    cols = [("speedup", "speedup"), ("predicted_speedup", "predicted"), ("predicted_speedup_ideal", "predicted (ideal)"),
            ("target_step_slowdown", "target step slowdown"), ("tokens_per_s", "tokens/s"),
            ("token_model_speedup", "token model"), ("draft_bound_speedup", "draft-bound"),
            ("step_accept_rate", "step accept"),
            ("draft_token_share", "draft token share"), ("accepted_steps_per_cycle", "accepted/cycle"),
            ("token_acceptance_rate", "token accept"), ("token_mean_acceptance_length", "mean accept len"),
            ("accuracy", "accuracy"), ("answer_agreement", "agreement with ar"),
            ("wasted_target_tokens", "wasted target tok"), ("cancelled_requests", "cancelled")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, s in summaries.items():
        lines.append(f"| {m} | " + " | ".join(_fmt(s.get(k)) for k, _ in cols) + " |")
    return lines


def plots(run_dir: Path, summaries: dict[str, dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summaries)
    x = range(len(methods))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar([i - 0.2 for i in x], [summaries[m].get("speedup", 0) for m in methods], 0.4, label="measured")
    ax1.bar([i + 0.2 for i in x], [summaries[m].get("predicted_speedup", 0) for m in methods], 0.4,
            label="predicted (theory)")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_xticks(list(x), methods, rotation=30, ha="right")
    ax1.set_ylabel("speedup vs ar (tokens/s)")
    ax1.legend()
    ax2.bar(list(x), [summaries[m]["step_accept_rate"] for m in methods], color="#55a868")
    ax2.set_xticks(list(x), methods, rotation=30, ha="right")
    ax2.set_ylabel("step accept rate")
    fig.tight_layout()
    first = run_dir / "speedup_and_accept_rate.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        by_depth = summaries[m].get("accept_rate_by_depth") or {}
        if by_depth:
            depths = sorted(int(d) for d in by_depth)
            ax.plot(depths, [by_depth[d] if d in by_depth else by_depth[str(d)] for d in depths], marker="o", label=m)
    ax.set_xlabel("depth in the lookahead window")
    ax.set_ylabel("accept rate")
    ax.set_ylim(0, 1.05)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    second = run_dir / "accept_rate_by_depth.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [first, second]


def evaluation_report(run_dir: Path, summary: dict) -> tuple[Path, list[Path]]:
    summaries = summary["methods"]
    figures = plots(run_dir, summaries)
    lines = [f"# Evaluation: {summary['num_problems']} problems", "",
             f"Target `{summary['target']}`, draft `{summary['draft']}`, verifier `{summary['verifier']}`, "
             f"gamma {summary['gamma']}. Speedup = tokens/s over `ar` on the same actors and problems; "
             "predicted = the LR theory at each method's measured step accept rate and draft/target cost ratio.", ""]
    lines += method_table(summaries)
    lines += ["", "![speedup](speedup_and_accept_rate.png)", "", "![depth](accept_rate_by_depth.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path, figures


QUANT_COLUMNS = ["method", "bits", "bits_per_weight", "ppl", "ppl_delta_vs_fp", "ppl_delta_pct"]


def quant_comparison(rows: list[dict], fp_ppl: float) -> tuple[list[list], list[str]]:
    """fp and quantized variants (dicts with method, bits, bits_per_weight, ppl): the table's rows (QUANT_COLUMNS,
    delta vs fp added) and its markdown lines."""
    data = [["fp", "32", 32.0, fp_ppl, 0.0, 0.0]]
    for r in rows:
        data.append([r["method"], str(r["bits"]), r["bits_per_weight"], r["ppl"], r["ppl"] - fp_ppl,
                     100.0 * (r["ppl"] - fp_ppl) / fp_ppl])
    lines = ["| method | bits | bits/weight | perplexity | delta vs fp | delta % |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {b} | {_fmt(bpw)} | {_fmt(p)} | {d:+.2f} | {pct:+.1f}% |" for m, b, bpw, p, d, pct in data]
    return data, lines
