"""How results print in a terminal: the finding table, the vessel line and the batch summary."""

from __future__ import annotations

from typing import Optional

from rich.table import Table


def findings_table(result, title: str, truth: Optional[dict[str, int]] = None) -> Table:
    table = Table(title=title)
    table.add_column("finding")
    table.add_column("probability", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("call", justify="left")
    if truth is not None:
        table.add_column("drawn in phantom", justify="left")
    for label in result.labels:
        p, t = result.probabilities[label], result.thresholds[label]
        row = [label, f"{p:.3f}", f"{t:.3f}", "above" if p >= t else "below"]
        if truth is not None:
            row.append("yes" if truth.get(label) else "no")
        table.add_row(*row)
    cua = result.cua
    if cua.get("score") is not None:
        call = ("not assessable: out of distribution" if cua.get("status") == "not_assessable" else
                "insufficient sampling: not judged" if cua.get("status") == "insufficient_sampling"
                else f"limited by {cua['limiting_term']}")
        table.add_row("CUA-pattern score", f"{cua['score']:.3f}", "", call,
                      *([""] if truth is not None else []), style="bold")
    return table


def cua_cell(cua: dict) -> str:
    if cua.get("score") is None:
        return "n/a"
    if cua.get("status") == "insufficient_sampling":
        return f"{cua['score']:.3f} (insufficient sampling)"
    if cua.get("status") == "not_assessable":
        return f"{cua['score']:.3f} (not assessable)"
    return f"{cua['score']:.3f}"


def ood_line(result) -> Optional[str]:
    """One line when the slide is out of distribution (the networks that say so, with their scores), else None."""
    if result.ood is None or not result.ood.flagged:
        return None
    return f"{result.slide_id}: OUT OF DISTRIBUTION - {result.ood.reason}"


def vessel_line(result) -> Optional[str]:
    """One line on the vessel analysis (count, small fat vessels, adequacy), or None when it did not run."""
    analysis = result.vessels
    if analysis is None:
        return None
    a = analysis.adequacy
    n = len(analysis.vessels)
    line = (f"{result.slide_id}: {n} vessel{'' if n == 1 else 's'}, {a['small_fat_vessels']} small in subcutaneous "
            f"fat ({a['min_small_fat_vessels']} needed): sampling {a['status'].replace('_', ' ')}")
    if a["status"] != "sufficient":
        line += " - the CUA pattern and the absence of vasculitis cannot be judged"
    return line


def summary_table(results) -> Table:
    labels = results[0].labels
    table = Table(title="calciscope predict (decision support, not a diagnosis)")
    table.add_column("slide")
    table.add_column("tiles", justify="right")
    for label in labels:
        table.add_column(label.replace("_", " "), justify="right")
    table.add_column("CUA pattern", justify="right")
    table.add_column("QC flags")
    for r in results:
        table.add_row(r.slide_id, str(r.n_tiles), *(f"{r.probabilities[label]:.3f}" for label in labels),
                      cua_cell(r.cua), ", ".join(r.qc.get("flags", [])) or "-")
    return table
