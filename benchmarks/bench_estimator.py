"""mdlgrok's search against the paper-faithful search, on the same checkpoints.

    make bench-estimator                       # checkpoints of runs/demo (make demo first)
    python benchmarks/bench_estimator.py RUN [RUN ...] --epochs 86 247 600 --out results/estimator/bench.parquet
    python benchmarks/bench_estimator.py RUN --epochs 86 --out TABLE --modes mdlgrok   # mdlgrok's search again

Prints, per run, checkpoint and eps, the bytes of both searches and their ratio, then the
wall time of all eps per checkpoint for both, and the worst ratio. Both use the full
training set as constraint.
With --modes, only the searches named run; the other's rows of the same checkpoints and eps are
kept from the existing --out table (the paper's search is deterministic: a new mdlgrok estimator
need not run it again). The paper's own code takes 333 s for all 7 eps of one checkpoint on 2 cores (measured here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from mdlgrok.complexity import PAPER_EPS, VERSION, estimate, paper_estimate
from mdlgrok.measures.complexity import closures
from mdlgrok.runs import RunDir, checkpoint_epoch, model_from_checkpoint, write_table

PAPER_CODE_SECONDS = 333.0


SEARCHES = {"mdlgrok": estimate, "paper": paper_estimate}


def bench_checkpoint(path: Path, eps, modes=tuple(SEARCHES)) -> list[dict]:
    model, data, epoch, _ = model_from_checkpoint(path)
    run = RunDir(Path(path).parent.parent).run_id
    loss_fn, _ = closures(data)
    rows = []
    for mode in modes:
        search = SEARCHES[mode]
        start = time.perf_counter()
        results = search(model, loss_fn, eps)
        seconds = time.perf_counter() - start
        evals = sum(r.loss_evals for r in results) if mode == "paper" else results[0].loss_evals
        for r in results:
            rows.append(
                {
                    "run": run,
                    "epoch": epoch,
                    "mode": mode,
                    "eps": r.eps,
                    "bytes": r.bits // 8,
                    "coarse_loss": r.coarse_loss,
                    "base_loss": r.base_loss,
                    "naive_bytes": r.naive_bits // 8,
                    "seconds_all_eps": seconds,
                    "loss_evals_all_eps": evals,
                    "estimator_version": VERSION if mode == "mdlgrok" else "",
                }
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", default=["runs/demo"], help="run folders (default runs/demo)")
    ap.add_argument("--epochs", type=int, nargs="+", help="checkpoints to use (default: 3 spread over each run)")
    ap.add_argument("--eps", type=float, nargs="+", default=list(PAPER_EPS))
    ap.add_argument("--out", help="also write the table here (parquet)")
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=list(SEARCHES),
        default=list(SEARCHES),
        help="searches to run (default both); the rows of the others are kept from the --out table",
    )
    args = ap.parse_args()
    kept = kept_rows(args.out, args.modes)
    if kept is None:
        return 2
    todo = []
    for path in args.runs:
        ckpts = {checkpoint_epoch(p): p for p in RunDir(path).checkpoints()}
        missing = [e for e in args.epochs or [] if e not in ckpts]
        if not ckpts or missing:
            what = missing or "at all"
            print(f"bench_estimator: {path} lacks checkpoints {what} (run its make target first)", file=sys.stderr)
            return 2
        epochs = args.epochs or [e for e in sorted(ckpts) if e >= 50][:: max(1, len(ckpts) // 3)][:3]
        todo += [ckpts[e] for e in epochs]
    rows = []
    for i, path in enumerate(todo):
        rows += bench_checkpoint(path, args.eps, args.modes)
        print(f"checkpoint {i + 1}/{len(todo)} done: {path}", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    index = ["run", "epoch", "eps"]
    if len(kept):
        kept = kept.merge(df[index].drop_duplicates(), on=index)  # only the checkpoints and eps measured now
        df = pd.concat([df, kept], ignore_index=True).sort_values(
            ["run", "epoch", "mode", "eps"], ascending=[True, True, True, False]
        )
    wide = df.pivot_table(index=index, columns="mode", values="bytes").sort_index(ascending=[True, True, False])
    wide["mdlgrok/paper"] = wide["mdlgrok"] / wide["paper"]
    print(wide.round(3).to_string())
    t = df.groupby(["run", "epoch", "mode"])[["seconds_all_eps", "loss_evals_all_eps"]].first().unstack("mode")
    t[("speed-up", "paper/mdlgrok")] = t[("seconds_all_eps", "paper")] / t[("seconds_all_eps", "mdlgrok")]
    t[("vs paper code", "333 s/mdlgrok")] = PAPER_CODE_SECONDS / t[("seconds_all_eps", "mdlgrok")]
    print(t.round(2).to_string())
    ratio = wide["mdlgrok/paper"]
    run, epoch, eps = ratio.idxmax()
    print(f"worst ratio mdlgrok/paper: {ratio.max():.3f} (run {run}, epoch {epoch}, eps {eps:g})")
    print(f"worst ratio per eps over the checkpoints: {ratio.groupby(level='eps').max().round(3).to_dict()}")
    if args.out:
        write_table(Path(args.out), df)
    return 0


def kept_rows(out: str | None, modes: list[str]) -> pd.DataFrame | None:
    """The rows of the searches not run now, from the existing --out table (None: an error)."""
    if set(modes) == set(SEARCHES):
        return pd.DataFrame()
    if not out or not Path(out).exists():
        print(
            "bench_estimator: --modes with one search keeps the other's rows from --out: give an existing table",
            file=sys.stderr,
        )
        return None
    old = pd.read_parquet(out)
    return old[~old["mode"].isin(modes)]


if __name__ == "__main__":
    sys.exit(main())
