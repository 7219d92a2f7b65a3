"""The `mdlgrok` command.

    mdlgrok train --task add --p 113 --preset ours --epochs 600 --seed 0 --out runs/add [--measure]
    mdlgrok measure runs/add --jobs 2
    mdlgrok complexity runs/add/checkpoints/epoch_000417.pt --eps 1 0.5
    mdlgrok summary runs/add --plot runs/add/rise_and_fall.png
    mdlgrok figures --results results
    mdlgrok sweep experiments/rise_and_fall.toml --jobs 2 [--length cpu|paper] [--dry-run]
    mdlgrok sweep experiments/rise_and_fall.toml --executor slurm --slurm-partition cpu --slurm-time 240
    mdlgrok sweep experiments/rise_and_fall.toml --measure-only [--remeasure] --jobs 2

Bad input prints one line on stderr and exits with status 2; a failed run exits with 1.
"""

from __future__ import annotations

import argparse
import sys

from mdlgrok.train import PAPER_EPS, TrainConfig, TrainingFailed


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"mdlgrok: error: {message}\n")


def _train_args(sub) -> None:
    p = sub.add_parser("train", help="train one run into a run folder")
    p.add_argument("--task", default="add", help="add, sub, mul, div, sq (a^2+b^2), quad (a^2+ab+b^2)")
    p.add_argument("--p", type=int, default=113, help="modulus")
    p.add_argument("--frac", type=float, help="train fraction (default: the paper's for the task)")
    p.add_argument("--model", default="transformer", help="transformer or mlp")
    p.add_argument("--layers", type=int, help="transformer blocks (default: 2 for sub/div, else 1)")
    p.add_argument("--attention", default="paper", help="paper (sum of values, as the paper ran) or softmax")
    p.add_argument("--pos-rows", type=int, help="positional table rows (default p+2 as the paper; 4 suffices)")
    p.add_argument("--preset", default="ours", help="none, wd or ours")
    p.add_argument("--wd", type=float, help="weight decay (overrides the preset)")
    p.add_argument("--gamma", type=float, help="spectral-entropy weight (overrides the preset)")
    p.add_argument("--sigma", type=float, help="noise scale (overrides the preset)")
    p.add_argument("--noise", default="gaussian", help="gaussian (sigma = std, the paper) or uniform (sigma = bin)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, help="minibatch (default min(512, N//2); 0 = full batch)")
    p.add_argument("--epochs", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="run folder (default runs/<task>-p<p>-<preset>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--measure", action="store_true", help="measure complexity at every checkpoint")
    p.add_argument("--eps", type=float, nargs="+", default=list(PAPER_EPS), help="tolerances in nats for --measure")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _measure_args(sub) -> None:
    p = sub.add_parser("measure", help="measure the complexity of every checkpoint of a run")
    p.add_argument("run", help="run folder")
    p.add_argument("--eps", type=float, nargs="+", default=list(PAPER_EPS), help="tolerances in nats")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes")
    p.add_argument("--mode", default="mdlgrok", help="mdlgrok (default) or paper (the paper's search)")
    p.add_argument("--quiet", action="store_true")

    c = sub.add_parser("complexity", help="print a complexity report for one checkpoint")
    c.add_argument("checkpoint")
    c.add_argument("--eps", type=float, nargs="+", default=list(PAPER_EPS), help="tolerances in nats")
    c.add_argument("--mode", default="mdlgrok", help="mdlgrok (default) or paper")

    s = sub.add_parser("summary", help="summarize a run: grokking epochs, accuracies, complexity")
    s.add_argument("run", help="run folder")
    s.add_argument("--plot", help="draw complexity and accuracy to this file (png or pdf)")

    f = sub.add_parser("figures", help="redraw every figure from the saved tables under results/")
    f.add_argument("--results", default="results", help="folder of experiment tables")


def _sweep_args(sub) -> None:
    w = sub.add_parser("sweep", help="run an experiment's grid (experiments/*.toml), skipping complete runs")
    w.add_argument("experiment", help="experiment file (TOML)")
    w.add_argument("--jobs", type=int, help="parallel processes (default 1; threads per process: cores // jobs); "
                   "with --executor slurm, the most array tasks at once (default: no limit)")
    w.add_argument("--length", help="a length of the experiment's [lengths] table, e.g. cpu or paper (default cpu)")
    w.add_argument("--root", default="runs", help="runs go to ROOT/<experiment name>/<key>/")
    w.add_argument("--dry-run", action="store_true", help="list the runs, their keys and states; train nothing")
    w.add_argument("--quiet", action="store_true", help="no progress lines")
    w.add_argument("--executor", default="local", choices=["local", "slurm", "submitit-local"],
                   help="local processes (default); a Slurm job array through submitit (pip install submitit); "
                        "or submitit's local executor")
    w.add_argument("--slurm-partition", help="Slurm partition (default: the cluster's)")
    w.add_argument("--slurm-time", type=int, default=240,
                   help="minutes per job (default 240); a job that reaches it is requeued and resumes")
    w.add_argument("--slurm-cpus", type=int, default=4, help="cpus per job, also its torch threads (default 4)")
    w.add_argument("--measure-only", action="store_true",
                   help="train nothing: measure the complexity of the complete runs that lack it, then gather")
    w.add_argument("--no-share", action="store_true",
                   help="train a run even when the same config is complete in another experiment under --root "
                        "(default: link to it)")
    w.add_argument("--device", default="auto", help="auto (default: cuda when torch sees a GPU), cpu or cuda")
    w.add_argument("--stack", default="auto", choices=["auto", "on", "off"],
                   help="train runs of one architecture together as stacks (mdlgrok.stacked): auto (default) "
                        "stacks on a GPU, where it pays, and runs one process per run on CPU")
    w.add_argument("--stack-size", type=int, default=64, help="most runs per stack (default 64)")
    w.add_argument("--remeasure", action="store_true", help="with --measure-only: measure every complete run again")
    w.add_argument("--mode", default="mdlgrok", help="with --measure-only: estimator, mdlgrok (default) or paper")


def parser() -> Parser:
    ap = Parser(prog="mdlgrok", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    _train_args(sub)
    _measure_args(sub)
    _sweep_args(sub)
    return ap


def cmd_train(a) -> int:
    from mdlgrok.train import train

    cfg = TrainConfig(task=a.task, p=a.p, frac=a.frac, model=a.model, layers=a.layers, attention=a.attention,
                      pos_rows=a.pos_rows, preset=a.preset, wd=a.wd, gamma=a.gamma, sigma=a.sigma,
                      noise=a.noise, lr=a.lr, batch=a.batch, epochs=a.epochs, seed=a.seed,
                      measure=a.measure, eps=tuple(a.eps))
    out = a.out or f"runs/{cfg.task}-p{cfg.p}-{cfg.preset}-s{cfg.seed}"
    measure_fn = None
    if cfg.measure:
        from mdlgrok.measure import measure_trainer

        measure_fn = lambda trainer: measure_trainer(trainer, cfg.eps)  # noqa: E731
    train(cfg, out, resume=a.resume, progress=not a.quiet, measure_fn=measure_fn)
    print(f"run complete: {out}")
    return 0


def cmd_measure(a) -> int:
    from mdlgrok.measure import measure_run
    from mdlgrok.results import RunDir

    table = measure_run(a.run, eps=a.eps, jobs=a.jobs, mode=a.mode, progress=not a.quiet)
    print(f"measured {table.epoch.nunique()} checkpoints of {a.run} into {RunDir(a.run).metrics}")
    return 0


def cmd_complexity(a) -> int:
    from mdlgrok.measure import checkpoint_report

    print(checkpoint_report(a.checkpoint, eps=a.eps, mode=a.mode))
    return 0


def cmd_summary(a) -> int:
    from mdlgrok.summary import summarize

    print(summarize(a.run, plot=a.plot))
    return 0


def cmd_sweep(a) -> int:
    from mdlgrok.sweep import command

    return command(a)


def cmd_figures(a) -> int:
    from mdlgrok.figures import draw_all

    files = draw_all(a.results)
    print(f"drew {len(files)} files under {a.results}/")
    return 0


COMMANDS = {"train": cmd_train, "measure": cmd_measure, "complexity": cmd_complexity, "summary": cmd_summary,
            "sweep": cmd_sweep, "figures": cmd_figures}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TrainingFailed as exc:
        print(f"mdlgrok: run failed: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:  # bad input: one line, status 2
        print(f"mdlgrok: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mdlgrok: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
