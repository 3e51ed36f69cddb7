"""The run table's label-confidence part (``tasks.confidence``): per estimator, low-confidence
labels among its most harmful training samples against the base rate, and the retrained test
accuracy of each arm (mean ± sd over seeds, sd with ddof=1)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_confidence(console: Console, result: dict | None) -> None:
    """Print the two tables of ``runs/<id>/confidence.json``; nothing when ``result`` is None."""
    if not result:
        return
    q = f"{100 * result['fraction']:g}%"
    table = Table(title=f"annotator confidence < {result['low_confidence_below']:g} among the "
                        f"{q} most harmful training samples")
    for column in ("estimator", "low-conf. / harmful", "rate %", "base rate %", "enrichment",
                   "p (hypergeom.)"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for name, e in result["estimators"].items():
        table.add_row(name, f"{e['low_in_harmful']}/{e['harmful']}",
                      f"{100 * e['rate_harmful']:.1f}", f"{100 * e['base_rate']:.1f}",
                      "–" if e["enrichment"] is None else f"x{e['enrichment']:.2f}",
                      f"{e['p_value']:.2g}")
    console.print(table)
    arms = Table(title=f"retrained test accuracy % (mean ± sd, ddof=1), {q} removed")
    for column in ("arm", "accuracy %", "seeds"):
        arms.add_column(column, justify="left" if column == "arm" else "right")
    for arm, a in result["accuracy"].items():
        sd = "–" if a["sd"] is None else f"{100 * a['sd']:.2f}"
        arms.add_row(arm, f"{100 * a['mean']:.2f} ± {sd}", str(a["seeds"]))
    console.print(arms)
