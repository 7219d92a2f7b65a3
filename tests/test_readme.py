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


def _setting_rows(text: str, experiment: str) -> list[dict[str, str]]:
    """The rows of the per-setting table under results/README.md's `## <experiment>` heading,
    each keyed by its column's heading."""
    section = re.search(rf"^## {experiment}\b.*?(?=^## |\Z)", text, re.M | re.S).group(0)
    lines = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("|---")]
    header = next(i for i, line in enumerate(lines) if "| setting |" in f"{line} ")
    keys = [c.strip() for c in lines[header].strip("|").split("|")]
    return [dict(zip(keys, (c.strip() for c in line.strip("|").split("|")))) for line in lines[header + 1 :]]


def test_phenomena_tables_match_the_committed_summaries():
    """[task |] setting | seeds | grokking epoch | peak B (epoch) | final B | peak / final | final
    test acc: means over the seeds of each setting (of each task, where the table has a task
    column) in results/<experiment>/summary.csv."""
    text = (ROOT / "results" / "README.md").read_text()
    checked = 0
    for experiment in ("grokfast", "ungrokking", "digits", "datasize"):
        path = ROOT / "results" / experiment / "summary.csv"
        if not path.exists():
            continue
        summary = pd.read_csv(path)
        rows = _setting_rows(text, experiment)
        by = ["task", "setting"] if "task" in rows[0] else ["setting"]
        assert len(rows) == len(summary.groupby(by)) > 0, experiment
        for row in rows:
            runs = summary[(summary[by].astype(str) == pd.Series({c: row[c] for c in by})).all(axis=1)]
            where = (experiment, *(row[c] for c in by))
            assert row["seeds"] == ", ".join(str(s) for s in sorted(runs.seed)), where
            grok = row["grokking epoch"]
            if grok.startswith("never"):
                assert runs.grokking_epoch.isna().all(), where
            else:
                assert _number(grok) == round(runs.grokking_epoch.mean()), where
            peak_bytes, peak_epoch = re.fullmatch(r"([\d,]+) \(([\d,]+)\)", row["peak B (epoch)"]).groups()
            assert _number(peak_bytes) == round(runs.peak_bytes.mean()), where
            assert _number(peak_epoch) == round(runs.peak_epoch.mean()), where
            assert _number(row["final B"]) == round(runs.final_bytes.mean()), where
            assert _number(row["peak / final"]) == round(runs.peak_over_final.mean(), 1), where
            assert _number(row["final test acc"]) == round(runs.final_test_acc.mean(), 3), where
            checked += 1
    assert checked >= 4
