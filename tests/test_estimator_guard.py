"""A regression guard for the estimator: a small model trained deterministically must keep being
described in at most about 10% more bytes than the estimator of this version finds (11,584 B at
eps 0.5 nats), so that a search that loses its tightness fails here."""

import torch

from mdlgrok.complexity import VERSION, decode, estimate
from mdlgrok.config import TrainConfig
from mdlgrok.measures.complexity import closures
from mdlgrok.runs import model_from_checkpoint
from mdlgrok.training import train

# add mod 23, half the data, "ours", 40 epochs, seed 0: 11,584 B with estimator versions 3-5, 10,892 B
# with 7, 10,848 B with 8, 11,020 B with 12 and 10,747 B with 14 and 18; the bound stays on the largest, as
# float rounding differs between CPUs.
MEASURED_BYTES = 11_584
BOUND = 1.1 * MEASURED_BYTES


def test_bytes_of_a_small_trained_model_stay_within_ten_percent(tmp_path):
    train(TrainConfig(task="add", p=23, frac=0.5, epochs=40, seed=0), tmp_path / "run", progress=False)
    model, data, epoch, _ = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_000040.pt")
    loss_fn, _ = closures(data)
    (r,) = estimate(model, loss_fn, [0.5])
    assert r.bits / 8 <= BOUND, f"estimator version {VERSION}: {r.bits // 8} bytes, bound {BOUND:.0f}"
    model.load_state_dict(decode(r.payload))  # and the figure stays honest
    assert loss_fn(model) <= r.base_loss + 0.5
    assert torch.get_num_threads() == 1  # the recorded figure was measured with one thread (conftest)
