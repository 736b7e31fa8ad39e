"""Results of benchmark runs: merged across runs, as a table (terminal or Markdown) and as a chart."""

from __future__ import annotations

from peftu.data.schema import LOWER_IS_BETTER
from peftu.errors import PeftuError
from peftu.evaluation.metrics import better
from peftu.quality.methods import method_names

BUCKETS = ("all", "few", "some", "many")
_PARTS = ("methods", "buckets", "per_user", "seconds")
"""The parts of a report that hold one entry per method."""


def merge_reports(reports: list[dict]) -> dict:
    """Reports of runs of one task on the same users with different `--methods`, as one.

    Long runs can be split by method (in parallel, sharing one store) and
    put together here; a method in several reports keeps its last result.
    """
    first = reports[0]
    for other in reports[1:]:
        if (other["task"], sorted(next(iter(other["per_user"].values())))) != \
                (first["task"], sorted(next(iter(first["per_user"].values())))):
            raise PeftuError(f"cannot merge results of {other['task']!r} with {first['task']!r}: "
                             "not the same task and users")
    merged = {**first, **{key: {} for key in _PARTS}}
    for key in _PARTS:
        for report in reports:
            merged[key] |= report[key]
    order = method_names()
    for key in _PARTS:
        merged[key] = dict(sorted(merged[key].items(), key=lambda kv: order.index(kv[0])
                                  if kv[0] in order else len(order)))
    merged["settings"] = {**first["settings"], "methods": list(merged["methods"])}
    for report in reports:  # the run that had the `selected` row says who won
        if "choices" in report:
            merged["choices"] = report["choices"]
    return merged


def bootstrap_interval(values: list[float], *, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of `values` (one per user) by resampling users with replacement."""
    import random

    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(rounds))
    return means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def _interval(report: dict, name: str) -> str:
    values = [m[report["metric"]] for m in report["per_user"][name].values() if report["metric"] in m]
    if len(values) < 2:
        return "-"
    low, high = bootstrap_interval(values)
    return f"{low:.3f}-{high:.3f}"


def _rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: one row per method, one column per activity bucket, and the
    95% bootstrap interval over users of the overall score."""
    any_method = next(iter(report["buckets"].values()))
    present = [b for b in BUCKETS if b in any_method]
    header = ["method", f"all ({any_method['all']['n']} users)", "95% interval",
              *[f"{b} ({any_method[b]['n']} users)" for b in present[1:]], "vs majority", "seconds"]
    metric = report["metric"]
    reference = report["methods"].get("majority")
    rows = []
    for name, buckets in report["buckets"].items():
        cells = [f"{buckets[b][metric]:.3f}" if b in buckets else "-" for b in present]
        value = report["methods"][name]
        if reference is None or name == "majority" or value is None:
            verdict = ""
        else:
            verdict = "beats" if better(metric, value, reference) else "does not beat"
        rows.append([name, cells[0], _interval(report, name), *cells[1:], verdict, f"{report['seconds'][name]:.0f}"])
    return header, rows


def render_table(report: dict):
    """The rich table printed at the end of a run."""
    from rich.table import Table

    header, rows = _rows(report)
    table = Table(title=f"{report['task']}: per-user macro {report['metric']} on the test split")
    for col in header:
        table.add_column(col, justify="left" if col in ("method", "vs majority") else "right")
    for row in rows:
        table.add_row(*row)
    return table


def render_markdown(report: dict) -> str:
    """The same table as Markdown, with what it was run on (for docs/results.md)."""
    header, rows = _rows(report)
    ex, hp = report["examples"], report["settings"]["hparams"]
    about = (f"**{report['task']}** ({report['kind']}, per-user macro {report['metric']}, "
             f"{'lower' if report['metric'] in LOWER_IS_BETTER else 'higher'} is better): "
             f"{report['users']} users, {ex['train']} train / {ex['val']} val / {ex['test']} test examples, "
             f"seed {hp['seed']}, {hp['epochs']} epoch(s) per user, max_len {hp['max_len']}, "
             f"k={report['settings']['k']}.")
    lines = [about, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_results(reports: list[dict], path: str) -> None:
    """One panel per task: each method's overall score as a bar, the majority baseline as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4.2), squeeze=False)
    for ax, report in zip(axes[0], reports):
        names = [n for n, v in report["methods"].items() if v is not None]
        ax.bar(range(len(names)), [report["methods"][n] for n in names], color="tab:blue")
        if report["methods"].get("majority") is not None:
            ax.axhline(report["methods"]["majority"], color="tab:red", linestyle="--", label="per-user majority")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        arrow = "lower is better" if report["metric"] in LOWER_IS_BETTER else "higher is better"
        ax.set_title(f"{report['task']} ({report['users']} users)")
        ax.set_ylabel(f"per-user macro {report['metric']} ({arrow})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
