"""Complexity by compression: the shortest description found of a coarse-grained network
whose training loss stays within eps of the original's.

    from mdlgrok.complexity import estimate, decode
    results = estimate(model, loss_fn, eps=[4, 2, 1, 0.5, 0.25, 0.125, 0.0625])
    state = decode(results[0].payload)   # a state dict for model.load_state_dict
"""

from mdlgrok.complexity.estimate import PAPER_EPS, Result, estimate, naive_bits
from mdlgrok.complexity.payload import decode
from mdlgrok.complexity.search import LossError

__all__ = ["PAPER_EPS", "LossError", "Result", "decode", "estimate", "naive_bits"]
