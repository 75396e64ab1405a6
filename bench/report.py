"""Figures, their medians, the targets, and the table, JSON and chart made of them."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("direct", "haproxy", "zotlb")


@dataclass
class Figure:
    """One measured quantity for each target; every run appends a value."""

    key: str
    title: str
    unit: str
    higher_is_better: bool = True
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, target: str, value: float) -> None:
        self.values.setdefault(target, []).append(value)

    def median(self, target: str) -> float | None:
        runs = self.values.get(target)
        return statistics.median(runs) if runs else None

    def ratio(self, num: str, den: str) -> float | None:
        a, b = self.median(num), self.median(den)
        if a is None or not b:
            return None
        return a / b

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "results": {},
        }
        for target, runs in self.values.items():
            out["results"][target] = {
                "median": statistics.median(runs),
                "min": min(runs),
                "max": max(runs),
                "runs": runs,
            }
        out["ratios"] = {
            "zotlb/haproxy": self.ratio("zotlb", "haproxy"),
            "zotlb/direct": self.ratio("zotlb", "direct"),
        }
        return out


@dataclass
class Target:
    name: str
    figure: str
    # "zotlb/haproxy", "zotlb/direct" (a ratio) or "zotlb" (an absolute value).
    measure: str
    op: str  # ">=" or "<"
    threshold: float
    value: float | None = None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return (
            self.value >= self.threshold
            if self.op == ">="
            else self.value < self.threshold
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "figure": self.figure,
            "measure": self.measure,
            "op": self.op,
            "threshold": self.threshold,
            "value": self.value,
            "met": self.met,
        }


class Results:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.figures: dict[str, Figure] = {}
        self.targets: list[Target] = []

    def figure(
        self, key: str, title: str, unit: str, higher_is_better: bool = True
    ) -> Figure:
        if key not in self.figures:
            self.figures[key] = Figure(key, title, unit, higher_is_better)
        return self.figures[key]

    def evaluate(self, target: Target) -> None:
        fig = self.figures.get(target.figure)
        if fig is not None:
            if target.measure == "zotlb":
                target.value = fig.median("zotlb")
            else:
                num, den = target.measure.split("/")
                target.value = fig.ratio(num, den)
        self.targets.append(target)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "figures": {key: fig.to_json() for key, fig in self.figures.items()},
            "targets": [t.to_json() for t in self.targets],
        }

    # --- output ------------------------------------------------------------------

    def table(self) -> str:
        lines = [
            "| figure | unit | direct | HAProxy | zotlb | zotlb/HAProxy | zotlb/direct |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for fig in self.figures.values():
            cells = [_cell(fig, col) for col in COLUMNS]
            ratios = [
                _ratio(fig.ratio("zotlb", "haproxy")),
                _ratio(fig.ratio("zotlb", "direct")),
            ]
            unit = fig.unit + ("" if fig.higher_is_better else " (lower is better)")
            lines.append(
                f"| {fig.title} | {unit} | " + " | ".join(cells + ratios) + " |"
            )
        lines += ["", "| target | wanted | measured | met |", "|---|---|---:|---|"]
        for t in self.targets:
            measured = "n/a" if t.value is None else f"{t.value:.3g}"
            met = {True: "yes", False: "**no**", None: "n/a"}[t.met]
            lines.append(
                f"| {t.name} | {t.measure} {t.op} {t.threshold:g} | {measured} | {met} |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path, stem: str) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out_dir / f"{stem}.json",
            "table": out_dir / f"{stem}.md",
            "png": out_dir / f"{stem}.png",
        }
        paths["json"].write_text(json.dumps(self.to_json(), indent=2) + "\n")
        header = "\n".join(f"- {k}: {v}" for k, v in self.meta.items())
        paths["table"].write_text(header + "\n\n" + self.table())
        self.chart(paths["png"])
        return paths

    def chart(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [
            (fig.title, fig.ratio("zotlb", "haproxy"), fig.ratio("zotlb", "direct"))
            for fig in self.figures.values()
            if fig.higher_is_better and fig.ratio("zotlb", "haproxy") is not None
        ]
        height = 1.2 + 0.35 * max(1, len(rows))
        fig, ax = plt.subplots(figsize=(9, height))
        ys = range(len(rows))
        ax.barh(
            [y + 0.2 for y in ys],
            [r[1] or 0 for r in rows],
            0.4,
            label="zotlb / HAProxy",
        )
        ax.barh(
            [y - 0.2 for y in ys],
            [r[2] or 0 for r in rows],
            0.4,
            label="zotlb / direct",
        )
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ratio of medians (higher is better)")
        ax.set_title(f"zotlb bench ({self.meta.get('mode', '')})")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _cell(fig: Figure, target: str) -> str:
    runs = fig.values.get(target)
    if not runs:
        return "-"
    med = statistics.median(runs)
    if len(runs) == 1:
        return _num(med)
    return f"{_num(med)} ({_num(min(runs))}-{_num(max(runs))})"


def _num(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
