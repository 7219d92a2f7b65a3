"""Complexity by compression: the shortest description found of a coarse-grained network
whose training loss stays within eps of the original's.

    from mdlgrok.complexity import estimate, decode
    results = estimate(model, loss_fn, eps=[4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    model.load_state_dict(decode(results[0].payload))   # weights with loss <= base + eps

`paper_estimate` runs the paper's own search (its payloads decode with `decode_paper`).
The estimator imports nothing from training, tasks or sweeps: any torch module and loss closure.
"""

from mdlgrok.complexity.estimate import PAPER_EPS, Result, estimate, naive_bits
from mdlgrok.complexity.paper import decode_paper, paper_estimate
from mdlgrok.complexity.payload import decode
from mdlgrok.complexity.search import LossError

# The estimator's version, recorded in every measure row it writes. Bumped whenever the
# search or the payload format changes what a figure can be (docs/estimator.md lists them).
VERSION = "22"

__all__ = [
    "PAPER_EPS",
    "VERSION",
    "LossError",
    "Result",
    "decode",
    "decode_paper",
    "estimate",
    "naive_bits",
    "paper_estimate",
]
