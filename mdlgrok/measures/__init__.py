"""Measures of a checkpoint, each a column family beside the training metrics.

A measure is a function measure(model, data, cfg, payloads, epoch) -> rows, each row a dict
with metric, value, and optionally eps and codec, plus the `estimator`, `estimator_version`
and `options` that say what measured it; `expected(cfg)` names the (estimator, version,
options, eps) a complete measurement of one checkpoint holds. The measure stage
(mdlgrok/measure.py) runs them over a run's checkpoints into its measures table.

- complexity: description length of the coarse-grained weights (mdlgrok.complexity), bits
- norms: weight norm (sqrt of the sum of squares), mean spectral entropy (nats) and mean
  effective rank of the weight matrices
- llc: the local learning coefficient by SGLD (Lau et al. 2023), mean and spread over chains
- fourier: Nanda et al.'s progress measures for modular addition (key frequencies,
  restricted and excluded loss, Gini coefficients of Fourier norms)
"""

from mdlgrok.measures import complexity, fourier, llc, norms

MEASURES = {"complexity": complexity, "norms": norms, "llc": llc, "fourier": fourier}

__all__ = ["MEASURES"]
