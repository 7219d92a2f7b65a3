"""The `mdlgrok` command.

    mdlgrok train --task add --p 113 --preset ours --epochs 600 --seed 0 --out runs/add [--measure]
    mdlgrok measure runs/add --jobs 2 [--eps 0.5] [--estimator paper] [--measures complexity norms]
    mdlgrok complexity runs/add/checkpoints/epoch_000417.pt --eps 1 0.5 [--accuracy-drop 0]
    mdlgrok summary runs/add --plot runs/add/rise_and_fall.png
    mdlgrok figures --results results
    mdlgrok sweep experiments/rise_and_fall.toml --jobs 2 [--length cpu|paper] [--dry-run]
    mdlgrok sweep experiments/rise_and_fall.toml --measure-only [--again] --jobs 2
    mdlgrok convert runs/old-run        # an older run folder (or a sweep root) to the current layout

The flags of train come from TrainConfig's fields and the measure flags from MeasureConfig's
(mdlgrok/config.py). Bad input prints one line on stderr and exits with status 2; a failed
run exits with 1.
"""

from __future__ import annotations

import argparse
import sys

from mdlgrok.config import MeasureConfig, TrainConfig, add_arguments, from_arguments, given_arguments


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):  # no prefixes: --mode is not --model
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"mdlgrok: error: {message}\n")


def _train_args(sub) -> None:
    p = sub.add_parser("train", help="train one run into a run folder")
    add_arguments(p, TrainConfig)
    p.add_argument("--out", help="run folder (default runs/<task>-p<p>-<preset>-s<seed>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint, with its config (given flags must agree)",
    )
    p.add_argument("--measure", action="store_true", help="then measure every checkpoint (the measure stage)")
    add_arguments(p, MeasureConfig)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _measure_args(sub) -> None:
    p = sub.add_parser("measure", help="measure the checkpoints of a run into its measures.parquet")
    p.add_argument("run", help="run folder")
    add_arguments(p, MeasureConfig)
    p.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p.add_argument("--again", action="store_true", help="measure every checkpoint, also those measured already")
    p.add_argument("--quiet", action="store_true")

    c = sub.add_parser("complexity", help="print a complexity report for one checkpoint")
    c.add_argument("checkpoint")
    add_arguments(c, MeasureConfig, skip=("measures",))
    c.add_argument(
        "--accuracy-drop",
        type=float,
        default=None,
        help="also report the shortest description whose training accuracy stays within this of "
        "the original's, with no loss limit (0: the same accuracy)",
    )

    s = sub.add_parser("summary", help="summarize a run: grokking epochs, accuracies, complexity")
    s.add_argument("run", help="run folder")
    s.add_argument("--plot", help="draw complexity and accuracy to this file (png or pdf)")

    f = sub.add_parser("figures", help="redraw every figure from the saved tables under results/")
    f.add_argument("--results", default="results", help="folder of experiment tables")
    f.add_argument(
        "--only", nargs="+", metavar="FOLDER", help="redraw these folders of --results alone (e.g. digits, estimator)"
    )

    v = sub.add_parser("convert", help="convert an older run folder, experiment folder or sweep root")
    v.add_argument("path")
    v.add_argument("--estimator-version", default="unknown", help="the version to record on moved measure rows")


def _sweep_args(sub) -> None:
    w = sub.add_parser("sweep", help="run an experiment's grid (experiments/*.toml), skipping complete runs")
    w.add_argument("experiment", help="experiment file (TOML)")
    w.add_argument(
        "--jobs",
        type=int,
        help="parallel processes (default 1; threads per process: cores // jobs); "
        "with --executor slurm, the most array tasks at once (default: no limit)",
    )
    w.add_argument("--length", help="a length of the experiment's [lengths] table, e.g. cpu or paper (default cpu)")
    w.add_argument("--root", default="runs", help="runs go to ROOT/<experiment name>/<key>/")
    w.add_argument("--dry-run", action="store_true", help="list the runs, their keys and states; train nothing")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    w.add_argument(
        "--executor",
        default="local",
        choices=["local", "slurm", "submitit-local"],
        help="local processes (default); a Slurm job array through submitit (pip install submitit); "
        "or submitit's local executor",
    )
    w.add_argument("--slurm-partition", help="Slurm partition (default: the cluster's)")
    w.add_argument(
        "--slurm-time",
        type=int,
        default=240,
        help="minutes per job (default 240); a job that reaches it is requeued and resumes",
    )
    w.add_argument("--slurm-cpus", type=int, default=4, help="cpus per job, also its torch threads (default 4)")
    w.add_argument(
        "--measure-only",
        action="store_true",
        help="train nothing: measure the complete runs' checkpoints that lack rows, then gather",
    )
    w.add_argument("--again", action="store_true", help="with --measure-only: measure every complete run again")
    add_arguments(w, MeasureConfig)
    w.add_argument(
        "--no-share",
        action="store_true",
        help="train a run even when the same config is complete in another experiment under --root "
        "(default: link to it)",
    )
    w.add_argument("--device", default="auto", help="auto (default: cuda when torch sees a GPU), cpu or cuda")
    w.add_argument(
        "--stack",
        default="auto",
        choices=["auto", "on", "off"],
        help="train runs of one architecture together as stacks (training/stacked.py): auto (default) "
        "stacks on a GPU, where it pays, and runs one process per run on CPU",
    )
    w.add_argument("--stack-size", type=int, default=64, help="most runs per stack (default 64)")


def parser() -> Parser:
    ap = Parser(prog="mdlgrok", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_args(sub)
    _measure_args(sub)
    _sweep_args(sub)
    return ap


def _measure_given(a) -> bool:
    return any(getattr(a, f, None) is not None for f in ("eps", "estimator", "measures"))


def _resumed_config(a) -> TrainConfig | None:
    """With --resume --out RUN: the run's own config, with the flags given on top (a flag that
    changes the weights is then refused by the training loop); None otherwise."""
    from mdlgrok.runs import RunDir
    from mdlgrok.training.loop import saved_config

    run = RunDir(a.out) if a.resume and a.out else None
    if run is None or not run.config.exists():
        return None
    return TrainConfig(**{**saved_config(run).to_dict(), **given_arguments(TrainConfig, a)})


def cmd_train(a) -> int:
    from mdlgrok.training import train

    cfg = _resumed_config(a) or from_arguments(TrainConfig, a)
    mcfg = from_arguments(MeasureConfig, a)
    if _measure_given(a) and not a.measure:
        raise ValueError("--eps, --estimator and --measures go with --measure")
    out = a.out or f"runs/{cfg.task}-p{cfg.p}-{cfg.preset}-s{cfg.seed}"
    hook = None
    if a.measure:
        from mdlgrok.measure import checkpoint_hook

        hook = checkpoint_hook(mcfg)
    train(cfg, out, resume=a.resume, progress=not a.quiet, on_checkpoint=hook)
    if a.measure:  # checkpoints written before a resume, measured now through the same stage
        from mdlgrok.measure import measure_run

        measure_run(out, mcfg, progress=not a.quiet)
    print(f"run complete: {out}")
    return 0


def cmd_measure(a) -> int:
    from mdlgrok.measure import measure_run
    from mdlgrok.runs import RunDir

    new = measure_run(a.run, from_arguments(MeasureConfig, a), jobs=a.jobs, again=a.again, progress=not a.quiet)
    print(f"measured {new.epoch.nunique()} checkpoints of {a.run} into {RunDir(a.run).measures}")
    return 0


def cmd_complexity(a) -> int:
    from mdlgrok.measure import checkpoint_report

    cfg = from_arguments(MeasureConfig, a)
    if a.accuracy_drop is not None and not 0 <= a.accuracy_drop < 1:
        raise ValueError(f"--accuracy-drop must be in [0, 1), got {a.accuracy_drop:g}")
    if a.accuracy_drop is not None and cfg.estimator != "mdlgrok":
        raise ValueError("--accuracy-drop needs --estimator mdlgrok (the paper's search has no accuracy constraint)")
    print(checkpoint_report(a.checkpoint, cfg, a.accuracy_drop))
    return 0


def cmd_summary(a) -> int:
    from mdlgrok.analysis import summarize
    from mdlgrok.runs import RunDir

    run = RunDir(a.run)
    table = run.read_all()
    if table.empty:
        raise FileNotFoundError(f"{a.run} holds no metrics.parquet")
    lines = [summarize(table, run.read_status(), str(run.path))]
    if a.plot:
        from mdlgrok.analysis import estimator_rows, main_eps
        from mdlgrok.plots import rise_and_fall

        files = rise_and_fall(estimator_rows(table), a.plot, eps=main_eps(table), title=run.run_id)
        lines.append("figure: " + ", ".join(str(f) for f in files))
    lines.append(f"results: {run.metrics}, {run.measures} (pandas.read_parquet), checkpoints in {run.ckpt_dir}")
    print("\n".join(lines))
    return 0


def cmd_sweep(a) -> int:
    from mdlgrok.sweep.command import command

    return command(a, from_arguments(MeasureConfig, a) if _measure_given(a) else None)


def cmd_figures(a) -> int:
    from mdlgrok.figures import draw_all

    files = draw_all(a.results, a.only)
    print(f"drew {len(files)} files under {a.results}/")
    return 0


def cmd_convert(a) -> int:
    from mdlgrok.sweep.command import convert_folder

    lines = convert_folder(a.path, a.estimator_version)
    print("\n".join(lines) if lines else f"{a.path}: nothing to convert")
    return 0


COMMANDS = {
    "train": cmd_train,
    "measure": cmd_measure,
    "complexity": cmd_complexity,
    "summary": cmd_summary,
    "sweep": cmd_sweep,
    "figures": cmd_figures,
    "convert": cmd_convert,
}


def main(argv: list[str] | None = None) -> int:
    from mdlgrok.training import TrainingFailed

    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TrainingFailed as exc:
        print(f"mdlgrok: run failed: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, status 2
        print(f"mdlgrok: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mdlgrok: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
