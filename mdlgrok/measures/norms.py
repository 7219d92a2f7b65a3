"""Weight norm, spectral entropy and effective rank of a checkpoint: the definitions training records."""

from __future__ import annotations

import json

from mdlgrok.regularizers import effective_ranks, mean_spectral_entropy
from mdlgrok.training.objective import weight_norm

NAME, VERSION, OPTIONS = "norms", "1", json.dumps({})


def expected(cfg) -> set[tuple]:
    return {(NAME, VERSION, OPTIONS, None)}


def measure(model, data, cfg, payloads=None, epoch: int = 0) -> list[dict]:
    ranks = [float(r) for r in effective_ranks(model)]
    values = {
        "weight_norm": weight_norm(model),
        "spectral_entropy": float(mean_spectral_entropy(model).detach()),
        "effective_rank": sum(ranks) / len(ranks),
    }
    return [
        {"metric": k, "value": v, "estimator": NAME, "estimator_version": VERSION, "options": OPTIONS}
        for k, v in values.items()
    ]
