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


def test_paper_length_tables_match_the_committed_paper_numbers():
    """Each `## paper length: <experiment>` section of results/README.md against
    results/paper/<experiment>/paper_numbers.csv."""
    text = (ROOT / "results" / "README.md").read_text()
    sections = re.findall(r"^## paper length: (\w+)\b.*?(?=^## |\Z)", text, re.M | re.S)
    assert "rise_and_fall" in sections
    for experiment in sections:
        section = re.search(rf"^## paper length: {experiment}\b.*?(?=^## |\Z)", text, re.M | re.S).group(0)
        rows = re.findall(
            r"^\| (add|mul|sub|div), (ours|none)(?:, seed (\d+) \(v(\w+)\))? \| ([\d,]+) \((\d+)\) \|(.*)\|$",
            section,
            re.M,
        )
        numbers = pd.read_csv(ROOT / "results" / "paper" / experiment / "paper_numbers.csv")
        assert len(rows) == len(numbers) > 0, experiment
        assert len({row[:3] for row in rows}) == len(rows), experiment  # one row per task, preset, seed
        for task, preset, seed, version, peak, peak_epoch, rest in rows:
            run = numbers[(numbers.task == task) & (numbers.preset == preset)]
            if seed:  # a row per seed, with the estimator version that measured it
                run = run[run.seed == int(seed)]
            assert len(run) == 1, (task, preset, seed)
            run = run.iloc[0]
            assert not seed or str(run.estimator_version) == version
            at917, at2015, at9727, ratio, grok, acc, naive = (c.strip() for c in rest.split("|")[:7])
            assert _number(peak) == run.peak_bytes and int(peak_epoch) == run.peak_epoch
            at = [_number(x) for x in (at917, at2015, at9727)]
            assert at == [run.bytes_at_917, run.bytes_at_2015, run.bytes_at_9727]
            assert _number(ratio) == round(run.peak_over_final, 1) and _number(naive) == round(run.naive_over_final)
            assert (math.isnan(_number(grok)) and math.isnan(run.grokking_epoch)) or _number(grok) == run.grokking_epoch
            assert _number(acc) == round(run.final_test_acc, 3)


def _setting_rows(text: str, experiment: str) -> list[list[str]]:
    """The rows of the per-setting table under results/README.md's `## <experiment>` heading."""
    section = re.search(rf"^## {experiment}\b.*?(?=^## |\Z)", text, re.M | re.S).group(0)
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| setting") and not line.startswith("|---")
    ]


def test_phenomena_tables_match_the_committed_summaries():
    """setting | seeds | grokking epoch | peak B (epoch) | final B | peak / final | final test acc:
    means over the seeds of each setting in results/<experiment>/summary.csv."""
    text = (ROOT / "results" / "README.md").read_text()
    checked = 0
    for experiment in ("grokfast", "ungrokking", "digits", "datasize"):
        path = ROOT / "results" / experiment / "summary.csv"
        if not path.exists():
            continue
        summary = pd.read_csv(path)
        rows = _setting_rows(text, experiment)
        assert len(rows) == summary.setting.nunique() > 0, experiment
        for setting, seeds, grok, peak, final, ratio, acc in rows:
            runs = summary[summary.setting == setting]
            assert seeds == ", ".join(str(s) for s in sorted(runs.seed)), (experiment, setting)
            if grok.startswith("never"):
                assert runs.grokking_epoch.isna().all(), (experiment, setting)
            else:
                assert _number(grok) == round(runs.grokking_epoch.mean()), (experiment, setting)
            peak_bytes, peak_epoch = re.fullmatch(r"([\d,]+) \(([\d,]+)\)", peak).groups()
            assert _number(peak_bytes) == round(runs.peak_bytes.mean()), (experiment, setting)
            assert _number(peak_epoch) == round(runs.peak_epoch.mean()), (experiment, setting)
            assert _number(final) == round(runs.final_bytes.mean()), (experiment, setting)
            assert _number(ratio) == round(runs.peak_over_final.mean(), 1), (experiment, setting)
            assert _number(acc) == round(runs.final_test_acc.mean(), 3), (experiment, setting)
            checked += 1
    assert checked >= 4
