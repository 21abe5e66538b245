"""PNG plots of a run's report (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def llm_per_round(report: dict, path: Path) -> Path:
    """LLM transmissions per round, one line per method."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in report.get("rounds", {}).get("by_method", {}).items():
        ax.plot([r["round"] for r in series], [r["llm"] for r in series], marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("tokens sent to the LLM")
    ax.set_title("LLM transmissions per round")
    ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_transmissions(report: dict, path: Path) -> Path:
    """One point per method, the lambda sweep curves of FedHLM and the static HLM, and the reference curves."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["methods"].items():
        ax.scatter(100 * m["llm_share"], 100 * m["accuracy"], label=name, zorder=3)
    for name, points in report.get("lambda_sweep", {}).items():
        pts = sorted(points, key=lambda p: p["llm_share"])
        ax.plot([100 * p["llm_share"] for p in pts], [100 * p["accuracy"] for p in pts], "--", marker=".",
                label=f"{name} (lambda sweep)")
    dense = (report.get("reference") or {}).get("dense") or []
    if dense:  # references, drawn thin and grey: what a hindsight threshold and an oracle would reach
        shares = [100 * p["share"] for p in dense]
        ax.plot(shares, [100 * p["uncertainty"] for p in dense], color="grey", lw=1, label="uncertainty curve (reference)")
        ax.plot(shares, [100 * p["oracle"] for p in dense], color="grey", lw=1, ls=":", label="oracle (reference)")
    ax.set_xlabel("tokens sent to the LLM (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs transmissions")
    ax.legend(fontsize=8)
    return _save(fig, path)


def threshold_convergence(report: dict, path: Path) -> Path:
    """Effective entropy threshold per round: each edge (cluster) and the global model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = report.get("federated", {}).get("rounds", [])
    edges = sorted({e for r in rounds for e in r.get("edges", {})})
    for e in edges:
        pts = [(r["round"], r["edges"][e]) for r in rounds if e in r.get("edges", {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"edge {e}")
    glob = [(r["round"], r["global"]) for r in rounds if r.get("global") is not None]
    if glob:
        ax.plot([p[0] for p in glob], [p[1] for p in glob], "k-s", label="global")
    central = report.get("federated", {}).get("central_tau")
    if central is not None:
        ax.axhline(central, color="grey", ls=":", label="central optimum")
    ax.set_xlabel("round")
    ax.set_ylabel("entropy threshold tau (nats)")
    ax.set_title("threshold convergence per cluster")
    ax.legend(fontsize=8)
    return _save(fig, path)


def p2p_vs_delta(report: dict, path: Path) -> Path:
    """Peer hit rate and wrong-reuse rate against the similarity threshold delta."""
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = sorted(report.get("delta_sweep", []), key=lambda p: p["delta"])
    if pts:
        ax.plot([p["delta"] for p in pts], [100 * p["hit_rate"] for p in pts], marker="o", label="hit rate")
        ax.plot([p["delta"] for p in pts], [100 * (p["wrong_reuse_rate"] or 0) for p in pts], marker="x",
                label="wrong reuse (audited)")
    ax.set_xlabel("delta (cosine similarity)")
    ax.set_ylabel("%")
    ax.set_title("P2P hit rate vs delta")
    ax.legend(fontsize=8)
    return _save(fig, path)


def feature_ablation(result: dict, path: Path) -> Path:
    """`fedhlm bench heads`: accuracy at each share sent, per feature subset and head (cross-fitted), and the oracle."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    shares = result["shares"]
    x = [100 * s for s in shares]
    for row in result["rows"]:
        style = "-" if row["head"] == "scalar" else ("--" if row["head"] == "linear" else ":")
        ax.plot(x, [100 * row["cross_fit"][s] for s in shares], style, marker=".", label=f"{row['features']} ({row['head']})")
    ax.plot(x, [100 * result["oracle"][s] for s in shares], color="grey", lw=1, label="oracle (reference)")
    ax.axhline(100 * result["llm_accuracy"], color="grey", ls="-.", lw=1, label="LLM alone")
    ax.set_xlabel("articles sent to the LLM (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"routing features ({result['task']}, {result['folds']}-fold cross-fit)")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def quality_vs_transmissions(report: dict, path: Path) -> Path:
    """Generation: one point per method, ROUGE-L of its titles against the share of tokens it sent."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["methods"].items():
        ax.scatter([100 * m["llm_share"]], [m["rouge_l"]], label=name)
    ax.set_xlabel("tokens sent to the LLM (%)")
    ax.set_ylabel("ROUGE-L F1 against the real title")
    ax.set_title("title generation: quality vs transmissions")
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_all(report: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        llm_per_round(report, out_dir / "llm_per_round.png"),
        accuracy_vs_transmissions(report, out_dir / "accuracy_vs_transmissions.png"),
        threshold_convergence(report, out_dir / "threshold_convergence.png"),
    ]
    if report.get("delta_sweep"):
        paths.append(p2p_vs_delta(report, out_dir / "p2p_vs_delta.png"))
    return paths
