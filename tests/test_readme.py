"""The README's results table says what results/rise_and_fall/summary.csv holds."""

import math
import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).parent.parent


def _number(text: str) -> float:
    text = text.strip().rstrip("x").replace(",", "")
    return math.nan if text == "never" else float(text)


def test_readme_results_table_matches_the_committed_summary():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (add|mul), (ours|none) \|(.*)\|$", readme, re.M)
    assert len(rows) == 4
    summary = pd.read_csv(ROOT / "results" / "rise_and_fall" / "summary.csv")
    for task, preset, cells in rows:
        runs = summary[(summary.task == task) & (summary.preset == preset)]
        assert len(runs) == 3
        peak, final, ratio, grok, acc = (_number(c) for c in cells.split("|"))
        assert peak == round(runs.peak_bytes.mean())
        assert final == round(runs.final_bytes.mean())
        assert ratio == round(runs.peak_over_final.mean(), 1)
        assert (math.isnan(grok) and runs.grokking_epoch.isna().all()) or grok == round(runs.grokking_epoch.mean())
        assert acc == round(runs.final_test_acc.mean(), 3)
