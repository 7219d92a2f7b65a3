"""The one pipeline end to end, tiny (add mod 7, a few epochs): training writes the training
metrics, the measure stage the measures, whether it runs while training (train --measure) or
after; resuming and measuring again add rows beside the others; older folders convert; the
README's example runs."""

import json
import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import snapshot, tiny_config

from mdlgrok.cli import main
from mdlgrok.complexity import VERSION, decode_paper, paper
from mdlgrok.config import MeasureConfig
from mdlgrok.measure import checkpoint_hook, measure_run, missing_checkpoints
from mdlgrok.measures.complexity import options_of
from mdlgrok.runs import MEASURE_COLUMNS, METRIC_COLUMNS, RunDir, model_from_checkpoint
from mdlgrok.sweep import gather, plan, run_key
from mdlgrok.sweep.command import convert_folder
from mdlgrok.training import train
from mdlgrok.training.objective import evaluate

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = ["epoch", "step", "metric", "eps", "value", "codec", "estimator", "estimator_version", "options"]


def measure_rows(run: Path) -> pd.DataFrame:
    """A run's measure rows but for the estimator's wall time, in a fixed order."""
    rows = RunDir(run).read_measures()
    rows = rows[rows.metric != "estimator_seconds"]
    return rows.sort_values(["epoch", "eps", "estimator", "metric", "codec"]).reset_index(drop=True)


# ---------------------------------------------------------------- 1. measuring while training = after
def test_measuring_after_training_equals_measuring_while_training(tmp_path):
    cfg, mcfg = tiny_config(epochs=3), MeasureConfig(eps=[2.0])
    after, during = tmp_path / "after" / "run", tmp_path / "during" / "run"  # one run_id for both
    outcome = train(cfg, after, progress=False)
    assert outcome == {"path": str(after), "state": "complete", "epoch": 3}
    assert not RunDir(after).measures.exists() and not RunDir(after).payloads.exists()
    new = measure_run(after, mcfg, progress=False)
    assert sorted(new.epoch.unique()) == [1, 2, 3]
    train(cfg, during, progress=False, on_checkpoint=checkpoint_hook(mcfg))  # what `train --measure` does

    a, b = measure_rows(after), measure_rows(during)
    assert list(RunDir(after).read_measures().columns) == MEASURE_COLUMNS
    assert len(a) and set(a.run_id) == {"run"}
    pd.testing.assert_frame_equal(a[ROW], b[ROW], check_exact=True)  # every column, run_id too
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    bits = a[a.metric == "complexity_bits"]
    assert sorted(zip(bits.epoch, bits.eps)) == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert set(a.estimator) == {"mdlgrok"} and set(a.estimator_version) == {VERSION}
    assert set(a.options) == {options_of(mcfg)}
    # the training metrics are the same file, byte for byte: measuring never touches them
    assert RunDir(after).metrics.read_bytes() == RunDir(during).metrics.read_bytes()
    assert list(RunDir(after).read_metrics().columns) == METRIC_COLUMNS
    assert snapshot(RunDir(after).payloads) == snapshot(RunDir(during).payloads)  # the same payloads too
    assert sorted(snapshot(RunDir(after).payloads)) == sorted(
        [f"epoch_{e:06d}_eps_2.mdlgrok.bin" for e in (1, 2, 3)] + [f"epoch_{e:06d}.mdlgrok.json" for e in (1, 2, 3)]
    )
    for run in (after, during):
        saved = json.loads(RunDir(run).config.read_text())
        assert "eps" not in saved and "measure" not in saved and saved == cfg.to_dict() | {"betas": list(cfg.betas)}
        assert missing_checkpoints(RunDir(run), mcfg) == []
    # measured once more, nothing is left to do and nothing changes
    before = snapshot(after)
    assert measure_run(after, mcfg, progress=False).empty
    assert snapshot(after) == before


def test_a_stopped_measurement_keeps_the_checkpoints_it_finished(tmp_path, monkeypatch):
    import mdlgrok.measure as measure

    run, mcfg = tmp_path / "run", MeasureConfig(eps=[2.0])
    train(tiny_config(epochs=3), run, progress=False)
    real, calls = measure.measure_checkpoint, []

    def stops_at_the_third(path, cfg, threads=None):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(path, cfg)

    monkeypatch.setattr(measure, "measure_checkpoint", stops_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        measure_run(run, mcfg, progress=False)
    assert sorted(RunDir(run).read_measures().epoch.unique()) == [1, 2]
    monkeypatch.setattr(measure, "measure_checkpoint", real)
    assert sorted(measure_run(run, mcfg, progress=False).epoch.unique()) == [3]  # only what was left


# ---------------------------------------------------------------- 2. resume with new eps, another estimator
def test_resume_with_new_eps_then_another_estimator_keeps_every_row(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    base = ["train", "--task", "add", "--p", "7", "--out", str(out), "--quiet", "--measure"]
    assert main([*base, "--epochs", "2", "--eps", "2"]) == 0
    first = measure_rows(out)
    assert main([*base, "--epochs", "3", "--resume", "--eps", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"run complete: {out}"
    rows = measure_rows(out)
    bits = rows[rows.metric == "complexity_bits"]
    # eps 2 as first trained (epochs 1, 2); eps 1 for every checkpoint: 1 and 2 measured after the
    # resume (they were written before it), 3 while training
    assert sorted(zip(bits.epoch, bits.eps)) == [(1, 1.0), (1, 2.0), (2, 1.0), (2, 2.0), (3, 1.0)]
    pd.testing.assert_frame_equal(rows[rows.eps == 2.0].reset_index(drop=True), first, check_exact=True)
    assert sorted(RunDir(out).read_metrics().epoch.unique()) == [1, 2, 3]
    assert "eps" not in json.loads(RunDir(out).config.read_text())
    assert missing_checkpoints(RunDir(out), MeasureConfig(eps=[1.0])) == []
    assert len(missing_checkpoints(RunDir(out), MeasureConfig(eps=[2.0]))) == 1  # epoch 3 never measured at eps 2

    # the paper's estimator (a shorter search budget: the procedure, not its cost, is tested here)
    monkeypatch.setattr(paper, "INIT_POINTS", 2)
    monkeypatch.setattr(paper, "N_ITER", 2)
    assert main(["measure", str(out), "--estimator", "paper", "--eps", "2", "--quiet"]) == 0
    assert f"measured 3 checkpoints of {out}" in capsys.readouterr().out
    both = measure_rows(out)
    mine = both[both.estimator == "mdlgrok"].reset_index(drop=True)
    pd.testing.assert_frame_equal(mine, rows, check_exact=True)  # mdlgrok's rows kept as they were
    theirs = both[both.estimator == "paper"]
    pbits = theirs[theirs.metric == "complexity_bits"]
    assert sorted(zip(pbits.epoch, pbits.eps)) == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert set(pbits.codec) == {"bz2-pickle"} and set(theirs.estimator_version) == {VERSION}
    assert set(theirs.options) == {options_of(MeasureConfig(estimator="paper"))} != set(mine.options)
    # a paper payload decodes (decode_paper) into weights whose loss is the row's coarse loss
    model, data, epoch, _ = model_from_checkpoint(out / "checkpoints" / "epoch_000003.pt")
    payload = (RunDir(out).payloads / "epoch_000003_eps_2.paper.bin").read_bytes()
    at = theirs[theirs.epoch == 3].set_index(["metric", "codec"]).value
    assert 8 * len(payload) == at[("complexity_bits", "bz2-pickle")]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(decode_paper(payload, shapes), strict=False)
    assert evaluate(model, data.x_train, data.y_train)[0] == at[("coarse_train_loss", "")]
    assert (RunDir(out).payloads / "epoch_000003_eps_1.mdlgrok.bin").exists()  # both estimators' payloads
    assert (
        json.loads((RunDir(out).payloads / "epoch_000003.paper.json").read_text())["results"][0]["estimator"] == "paper"
    )
    # measured again with the same estimator and eps: nothing to do
    assert missing_checkpoints(RunDir(out), MeasureConfig(estimator="paper", eps=[2.0])) == []


# ---------------------------------------------------------------- 3. converting an older sweep root
def make_legacy(run: Path, eps: list[float]) -> None:
    """Turn a current run folder into the older layout: measure settings in config.json and in the
    checkpoints' configs, measure rows (eps, codec, estimator; no version or options) in metrics.parquet."""
    r = RunDir(run)
    cfg = json.loads(r.config.read_text())
    r.config.write_text(json.dumps({**cfg, "measure": True, "eps": eps}, indent=2))
    for ckpt in r.checkpoints():
        state = torch.load(ckpt, weights_only=True)
        state["config"] = json.dumps({**json.loads(state["config"]), "measure": True, "eps": eps})
        torch.save(state, ckpt)
    old = pd.concat(
        [
            r.read_metrics().assign(eps=float("nan"), codec="", estimator=""),
            r.read_measures().drop(columns=["estimator_version", "options"]),
        ],
        ignore_index=True,
    )
    old = old.assign(run_id=run.name)  # rows named by the folder they were written in
    old.to_parquet(r.metrics, index=False)
    r.measures.unlink()


def test_convert_folder_renames_relinks_and_converts_an_older_sweep_root(tmp_path):
    cfg, mcfg = tiny_config(epochs=2), MeasureConfig(eps=[2.0])
    key = run_key(cfg)
    built = tmp_path / "built" / key
    train(cfg, built, progress=False, on_checkpoint=checkpoint_hook(mcfg))
    training = RunDir(built).read_metrics()
    measured = RunDir(built).read_measures().assign(options="{}")  # older folders did not record options

    # a sweep root of the older version: experiment "a" trained the run under its older key,
    # experiment "b" links to it
    root = tmp_path / "runs"
    old_key = key.rsplit("-", 1)[0] + "-0123456789ab"
    shutil.copytree(built, root / "a" / old_key)
    make_legacy(root / "a" / old_key, [2.0])
    (root / "b").mkdir()
    (root / "b" / old_key).symlink_to(os.path.join("..", "a", old_key), target_is_directory=True)
    exp = {"name": "a", "base": {"task": "add", "p": 7, "epochs": 2}}
    assert [(r.key, r.state) for r in plan(exp, root)] == [(key, "new")]  # the older key is not found
    with pytest.raises(ValueError, match="convert"):  # an older folder is refused, with the way out
        train(cfg, root / "a" / old_key, resume=True, progress=False)

    lines = convert_folder(root, estimator_version=VERSION)
    assert f"converted {root / 'a' / old_key}" in lines and f"renamed {root / 'a' / old_key} -> {key}" in lines
    assert any(line.startswith(f"relinked {root / 'b' / old_key}") for line in lines)
    assert sorted(p.name for p in (root / "a").iterdir()) == [key]
    assert sorted(p.name for p in (root / "b").iterdir()) == [key]
    link = root / "b" / key
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == (root / "a" / key).resolve() and (link / "config.json").is_file()

    run = RunDir(root / "a" / key)
    assert json.loads(run.config.read_text()) == json.loads(RunDir(built).config.read_text())
    # the rows moved from metrics.parquet to measures.parquet (their run_id: checked last, below)
    pd.testing.assert_frame_equal(
        run.read_metrics().drop(columns="run_id"), training.drop(columns="run_id"), check_exact=True
    )
    pd.testing.assert_frame_equal(
        run.read_measures().drop(columns="run_id"), measured.drop(columns="run_id"), check_exact=True
    )
    model, _, epoch, _ = model_from_checkpoint(run.checkpoints()[-1])  # old checkpoint configs still load
    assert epoch == 2
    # the converted root is what the current version plans: complete, nothing to train or measure
    for name in ("a", "b"):
        (planned,) = plan({"name": name, "base": {"task": "add", "p": 7, "epochs": 2}}, root)
        assert (planned.key, planned.state) == (key, "complete")
    before = snapshot(root)
    assert convert_folder(root) == []  # converting again changes nothing
    assert snapshot(root) == before
    assert main(["convert", str(root)]) == 0
    # a renamed run's rows are named by its new key, as a run trained now would be: gathered
    # (here through the link) every row has its config columns
    pd.testing.assert_frame_equal(run.read_metrics(), training, check_exact=True)
    pd.testing.assert_frame_equal(run.read_measures(), measured, check_exact=True)
    table = gather(root / "b")
    assert set(table.run_id) == {key} and table[["task", "p", "preset", "seed"]].notna().all().all()
    assert len(table) == len(training) + len(measured)


# ---------------------------------------------------------------- 4. the README's example
def readme_example(path: Path = README) -> str | None:
    """The first ```python block in the section under the first heading that names an example."""
    in_code, section, block = False, False, None
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if in_code and block is not None:
                return "\n".join(block) + "\n"
            in_code = not in_code
            if in_code and section and line.strip() == "```python":
                block = []
            continue
        if in_code:
            if block is not None:
                block.append(line)
        elif line.startswith("#"):
            if section:
                return None  # the next heading: the example section had no python block
            section = "example" in line.lower()
    return None


def test_readme_example_runs(capsys):
    code = readme_example()
    if code is None:
        pytest.skip("README.md has no ```python block under an 'example' heading")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert re.search(r"\d+ bytes at eps 0.25 \(naive bzip2 of the weights: \d+\)", capsys.readouterr().out)


def test_the_worked_example_on_a_model_mdlgrok_did_not_build_runs(capsys):
    doc = README.parent / "docs" / "estimator.md"
    code = readme_example(doc)
    assert code is not None, "docs/estimator.md has lost its worked example"
    exec(compile(code, str(doc), "exec"), {"__name__": "example"})
    out = capsys.readouterr().out
    assert re.search(r"loss within 0.1 nats: \d+ bytes \(naive \d+\), 6 tensors", out)
    assert re.search(r"training accuracy kept: \d+ bytes", out) and "test accuracy of the coarse model" in out
