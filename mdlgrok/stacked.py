"""Many models of one architecture trained together in one process (one GPU, or one core).

N runs that differ only in seed and in element-wise settings (weight decay, gamma, sigma,
noise kind, lr, betas, Adam eps) share every shape, so their parameters stack into one
tensor per parameter name with a leading model axis. One step is then one vmapped forward
and backward (``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``), one
batched spectral penalty and one element-wise AdamW update for all N models.

Each model sees exactly what its own ``train.Trainer`` would: its own seeded split, its own
shuffle generator (seed + 1), its own noise generator (seed + 2, the same draws in the same
order as ``WeightNoise``) and its own init (``torch.manual_seed(seed)`` then ``build_model``).
On CPU the metrics equal N separate runs to float tolerance (tests/test_stacked.py).

    from mdlgrok.stacked import train_stacked
    frames = train_stacked([TrainConfig(task="add", seed=s, epochs=600) for s in range(8)])
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch.func import functional_call, stack_module_state, vmap
from torch.nn import functional as F

from mdlgrok.models import build_model
from mdlgrok.regularizers import singular_values, spectral_entropy
from mdlgrok.results import RunDir, environment, row, rows_to_frame, save_checkpoint, write_json, write_table
from mdlgrok.tasks import epoch_batches, make_dataset, paper_batch_size
from mdlgrok.train import LOG_PROB_FLOOR, TrainConfig, log_epochs, resume_point

# Fields that must agree for models to share one stacked step: the architecture and the data
# shapes (split sizes, batch sizes, number of steps). Everything else is per model.
SHARED_FIELDS = ("task", "p", "frac", "model", "layers", "attention", "pos_rows", "batch", "epochs")


def stack_mismatch(configs: list[TrainConfig]) -> str | None:
    """Why `configs` cannot be trained as one stack, or None when they can."""
    if not configs:
        return "no configs to stack"
    first = configs[0]
    diff = [f"{name} ({', '.join(sorted({repr(getattr(c, name)) for c in configs}))})"
            for name in SHARED_FIELDS if any(getattr(c, name) != getattr(first, name) for c in configs)]
    if diff:
        return ("stacked models must share architecture, task, split sizes, batch and epochs; "
                f"these differ: {'; '.join(diff)}")
    return None


def can_stack(configs: list[TrainConfig]) -> bool:
    """True when `configs` share everything but element-wise settings (seed, wd, gamma, sigma, ...)."""
    return stack_mismatch(configs) is None


def check_stackable(configs: list[TrainConfig]) -> None:
    """Raise ValueError naming the differing fields when `configs` cannot be stacked."""
    reason = stack_mismatch(configs)
    if reason:
        raise ValueError(reason)


def _per_model(values, like: torch.Tensor) -> torch.Tensor:
    """(N,) values as a tensor that broadcasts against a stacked (N, ...) parameter like `like`."""
    t = torch.tensor(values, dtype=like.dtype, device=like.device)
    return t.view(-1, *([1] * (like.ndim - 1)))


class StackedAdamW:
    """torch.optim.AdamW (single-tensor form) on stacked parameters, with per-model lr, betas,
    eps and weight decay. Per step and model, exactly torch's sequence:

        p *= 1 - lr * wd                                 (decoupled decay)
        m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
        p += -(lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Scalars are computed in Python doubles and rounded to the parameter dtype once, as torch
    does with its Python-number arguments.
    """

    def __init__(self, params: dict[str, torch.Tensor], lr, betas, eps, weight_decay):
        self.params = params
        self.lr, self.eps, self.wd = [float(x) for x in lr], [float(x) for x in eps], [float(x) for x in weight_decay]
        self.beta1, self.beta2 = [float(b[0]) for b in betas], [float(b[1]) for b in betas]
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.t = 0

    @torch.no_grad()
    def step(self, masks: dict[str, torch.Tensor | None] | None = None) -> None:
        """One update of every model. masks[name], an (N,) bool tensor, restricts the update of
        that parameter to the models marked True (the others keep it unchanged); None or absent
        updates all models. A parameter without a gradient is still decayed, as in train.py."""
        self.t += 1
        t = self.t
        decay = [1 - lr * wd for lr, wd in zip(self.lr, self.wd)]
        c1 = [1 - b for b in self.beta1]
        c2 = [1 - b for b in self.beta2]
        neg_step = [-(lr / (1 - b1**t)) for lr, b1 in zip(self.lr, self.beta1)]
        bc2_sqrt = [(1 - b2**t) ** 0.5 for b2 in self.beta2]
        for k, p in self.params.items():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            m, v = self.exp_avg[k], self.exp_avg_sq[k]
            new = p.mul(_per_model(decay, p))
            m.lerp_(g, _per_model(c1, p))
            v.mul_(_per_model(self.beta2, p)).addcmul_(g * _per_model(c2, p), g)
            denom = (v.sqrt() / _per_model(bc2_sqrt, p)).add_(_per_model(self.eps, p))
            new.addcdiv_(m * _per_model(neg_step, p), denom)
            mask = (masks or {}).get(k)
            if mask is None:
                p.copy_(new)
            else:
                p.copy_(torch.where(mask.view(-1, *([1] * (p.ndim - 1))), new, p))


def stacked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, B, V) logits, (N, B) targets -> (N,) mean clipped -ln p(y|x) in nats (train.cross_entropy per model)."""
    logp = F.log_softmax(logits.float(), dim=-1).gather(2, y[..., None]).squeeze(2)
    return -logp.clamp_min(LOG_PROB_FLOOR).mean(1)


def stacked_spectral_entropy(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) mean over weight matrices of H(W) per model: regularizers.mean_spectral_entropy on
    stacked parameters (regularizers.singular_values batches over the model dimension)."""
    mats = [w.reshape(w.shape[0], w.shape[1], -1) for w in params.values() if w.ndim >= 3]
    return torch.stack([spectral_entropy(s) for s in singular_values(mats)], dim=1).mean(1)


@dataclass
class ModelState:
    """Per-model bookkeeping of a stack: its config, data, generators and recorded rows."""

    cfg: TrainConfig
    run_id: str
    data: object
    shuffle_gen: torch.Generator
    noise_gen: torch.Generator
    failed: str = ""


class StackedTrainer:
    """N runs of one architecture trained in lockstep; model i behaves as Trainer(configs[i]).

    device: where parameters and data live. exact_noise: draw each model's noise on its CPU
    generator, tensor by tensor, exactly as WeightNoise (the default on CPU); False draws one
    flat vector per model from a generator on `device` (seeded seed + 2; reproducible, but not
    the CPU stream: the default off CPU, where the CPU draws and copies would dominate a step).
    """

    def __init__(self, configs: list[TrainConfig], run_ids: list[str] | None = None, device: str | torch.device = "cpu",
                 exact_noise: bool | None = None):
        check_stackable(configs)
        self.configs = list(configs)
        self.device = torch.device(device)
        self.exact_noise = self.device.type == "cpu" if exact_noise is None else exact_noise
        run_ids = run_ids or [f"stack{i}-seed{c.seed}" for i, c in enumerate(configs)]
        if len(run_ids) != len(configs):
            raise ValueError(f"{len(run_ids)} run ids for {len(configs)} configs")
        models, self.models_state = [], []
        for cfg, rid in zip(configs, run_ids):
            data = make_dataset(cfg.task_config())
            torch.manual_seed(cfg.seed)  # the init of Trainer(cfg)
            models.append(build_model(cfg.model_config()))
            noise_dev = "cpu" if self.exact_noise else self.device
            self.models_state.append(ModelState(cfg, rid, data, torch.Generator().manual_seed(cfg.seed + 1),
                                                torch.Generator(device=noise_dev).manual_seed(cfg.seed + 2)))
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(self.device).requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")  # shapes and code only; weights come from self.params
        self._eval_model = models[0].to(self.device)  # a real module, reloaded per model for evaluation
        self.n = len(configs)
        d = [m.data for m in self.models_state]
        for name in ("x_train", "y_train", "x_test", "y_test"):  # (N, n, 4) tokens and (N, n) targets
            setattr(self, name, torch.stack([getattr(x, name) for x in d]).to(self.device))
        n_train = self.x_train.shape[1]
        first = configs[0]
        self.batch = n_train if first.batch == 0 else (first.batch or paper_batch_size(n_train))
        regs = [c.reg_config() for c in configs]
        self.gamma = torch.tensor([r.gamma for r in regs], device=self.device)
        self.sigma = [r.sigma for r in regs]
        self.noise_kind = [r.noise for r in regs]
        self.opt = StackedAdamW(self.params, [c.lr for c in configs], [c.betas for c in configs],
                                [c.adam_eps for c in configs], [r.wd for r in regs])
        self.active = torch.ones(self.n, dtype=torch.bool, device=self.device)
        self.epoch, self.step_count = 0, 0
        self.rows: list[list[dict]] = [[] for _ in configs]

    # ----- one step -------------------------------------------------------------------------
    def _noise(self) -> dict[str, torch.Tensor] | None:
        """Per-model weight noise, stacked; None when no model uses noise."""
        if not any(self.sigma):
            return None
        if self.exact_noise:
            draws: dict[str, list[torch.Tensor]] = {k: [] for k in self.params}
            for i, st in enumerate(self.models_state):
                sigma, gen = self.sigma[i], st.noise_gen
                for k, p in self.params.items():  # model.parameters() order, as WeightNoise
                    shape = p.shape[1:]
                    if not sigma:
                        draws[k].append(torch.zeros(shape, dtype=p.dtype))
                    elif self.noise_kind[i] == "gaussian":
                        draws[k].append(torch.randn(shape, generator=gen, dtype=p.dtype) * sigma)
                    else:
                        draws[k].append((torch.rand(shape, generator=gen, dtype=p.dtype) - 0.5) * sigma)
            return {k: torch.stack(v).to(self.device) for k, v in draws.items()}
        sizes = [p[0].numel() for p in self.params.values()]
        dtype = next(iter(self.params.values())).dtype
        flat = torch.zeros(self.n, sum(sizes), dtype=dtype, device=self.device)
        for i, st in enumerate(self.models_state):
            if not self.sigma[i]:
                continue
            if self.noise_kind[i] == "gaussian":
                flat[i] = torch.randn(sum(sizes), generator=st.noise_gen, dtype=dtype, device=self.device) * self.sigma[i]
            else:
                flat[i] = (torch.rand(sum(sizes), generator=st.noise_gen, dtype=dtype, device=self.device) - 0.5) * self.sigma[i]
        return {k: chunk.view(p.shape) for (k, p), chunk in zip(self.params.items(), flat.split(sizes, dim=1))}

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(N, B, 4) tokens -> (N, B, vocab) logits, model i with params[...][i]."""
        def one(p, b, xs):
            return functional_call(self.base, (p, b), (xs,))

        return vmap(one)(params, self.buffers, x)

    def losses(self, idx: torch.Tensor) -> torch.Tensor:
        """(N,) training losses (clipped CE + gamma_i * mean spectral entropy) on the minibatches
        idx (N, B), at the noisy point; gradients reach self.params."""
        noise = self._noise()
        params = self.params if noise is None else {k: p + noise[k] for k, p in self.params.items()}
        rows = torch.arange(self.n, device=self.device)[:, None]
        loss = stacked_cross_entropy(self.forward(params, self.x_train[rows, idx]), self.y_train[rows, idx])
        use = self.gamma > 0
        if bool(use.all()):
            # "gamma * mean over all matrices of H(W)"
            loss = loss + self.gamma * stacked_spectral_entropy(params)
        elif bool(use.any()):
            # only the models with a penalty compute it, as Trainer (which skips gamma == 0)
            sel = use.nonzero().squeeze(1)
            penalty = self.gamma[sel] * stacked_spectral_entropy({k: v[sel] for k, v in params.items()})
            loss = loss.index_add(0, sel, penalty)
        return loss

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every model on minibatches idx (N, B); returns the (N,) losses."""
        for p in self.params.values():
            p.grad = None
        loss = self.losses(idx)
        loss.sum().backward()  # model i's parameters receive only d loss_i
        self.opt.step(self._masks())
        self.step_count += 1
        return loss.detach()

    def _masks(self) -> dict[str, torch.Tensor | None]:
        """Which models update each parameter: all but the failed ones."""
        all_active = bool(self.active.all())
        return {k: None if all_active else self.active for k in self.params}

    def train_epoch(self) -> torch.Tensor:
        """One pass over each model's own shuffled minibatches; (N,) sums of the batch losses."""
        n_train = self.x_train.shape[1]
        batches = [epoch_batches(n_train, self.batch, st.shuffle_gen) for st in self.models_state]
        total = torch.zeros(self.n, device=self.device)
        for parts in zip(*batches):
            total += self.step(torch.stack(parts).to(self.device))
        self.epoch += 1
        return total

    def mark_failures(self, epoch_losses: torch.Tensor) -> list[int]:
        """Mark the models whose epoch loss is NaN or infinite as failed (frozen from now on);
        returns the ones newly failed."""
        new = []
        for i, value in enumerate(epoch_losses.tolist()):
            ms = self.models_state[i]
            if not ms.failed and not math.isfinite(value):
                ms.failed = f"loss became {value} at epoch {self.epoch}"
                self.active[i] = False
                new.append(i)
        return new

    # ----- models and metrics ---------------------------------------------------------------
    @torch.no_grad()
    def model(self, i: int) -> torch.nn.Module:
        """Model i as a real module (a fresh copy, on self.device)."""
        m = copy.deepcopy(self._eval_model)
        m.load_state_dict({k: v[i].detach() for k, v in self.params.items()})
        return m

    @torch.no_grad()
    def metrics_all(self, chunk: int = 4096) -> list[dict[str, float]]:
        """train.model_metrics of every model, batched over the stack without autograd: one
        vmapped forward per chunk of examples, one batched spectral decomposition per shape."""
        out: dict[str, torch.Tensor] = {}
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            loss_sum = torch.zeros(self.n, dtype=torch.float64, device=self.device)
            correct = torch.zeros(self.n, dtype=torch.int64, device=self.device)
            for xs, ys in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)):
                logits = self.forward(self.params, xs)
                loss_sum += stacked_cross_entropy(logits, ys).double() * ys.shape[1]
                correct += (logits.argmax(-1) == ys).sum(1)
            out[f"{split}_loss"] = loss_sum / y.shape[1]
            out[f"{split}_acc"] = correct.double() / y.shape[1]
        out["weight_norm"] = sum(p.double().pow(2).flatten(1).sum(1) for p in self.params.values()).sqrt()
        out["spectral_entropy"] = stacked_spectral_entropy(self.params)
        mats = [w.reshape(w.shape[0], w.shape[1], -1) for w in self.params.values() if w.ndim >= 3]
        mats = [torch.where(w.isfinite(), w, 0.0) for w in mats]  # a failed model's rows are not recorded
        out["effective_rank"] = torch.stack([spectral_entropy(torch.linalg.svdvals(w)).exp() for w in mats], 1).mean(1)
        values = {k: v.tolist() for k, v in out.items()}  # in train.model_metrics' order
        return [{k: float(v[i]) for k, v in values.items()} for i in range(self.n)]

    def record(self) -> None:
        """Append the metric rows of every model that has not failed, as Trainer.record."""
        for i, (st, metrics) in enumerate(zip(self.models_state, self.metrics_all())):
            if not st.failed:
                self.rows[i] += [row(st.run_id, self.epoch, self.step_count, k, v) for k, v in metrics.items()]

    def frames(self) -> list[pd.DataFrame]:
        return [rows_to_frame(r) for r in self.rows]

    # ----- checkpoints: Trainer.state's format, so that either trainer resumes the other's runs
    def state(self, i: int) -> dict:
        """Model i's checkpoint, exactly as Trainer.state() writes it (model, torch AdamW state, rng)."""
        cfg = self.models_state[i].cfg
        model = self.model(i).cpu()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                weight_decay=cfg.reg_config().wd)
        if self.opt.t:
            for k, p in model.named_parameters():
                opt.state[p] = {"step": torch.tensor(float(self.opt.t)),
                                "exp_avg": self.opt.exp_avg[k][i].detach().cpu().clone(),
                                "exp_avg_sq": self.opt.exp_avg_sq[k][i].detach().cpu().clone()}
        st = self.models_state[i]
        return {"model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": {"shuffle": st.shuffle_gen.get_state(), "noise": st.noise_gen.get_state()},
                "epoch": self.epoch, "step": self.step_count, "config": json.dumps(cfg.to_dict())}

    @torch.no_grad()
    def load_state(self, i: int, ckpt: dict) -> None:
        """Restore model i from a checkpoint of Trainer.state() or state(); every model of a stack
        resumes from the same epoch and step (the optimizer's step count is shared)."""
        epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        if i and (epoch, step) != (self.epoch, self.step_count):
            raise ValueError(f"model {i} resumes from epoch {epoch}, step {step}, the stack from "
                             f"epoch {self.epoch}, step {self.step_count}: stack runs that stopped at the same epoch")
        names = list(self.params)
        for k in names:
            self.params[k][i] = ckpt["model"][k].to(self.device)
        moments = ckpt["optimizer"]["state"]
        for j, k in enumerate(names):
            state = moments.get(j, moments.get(str(j)))
            for name, target in (("exp_avg", self.opt.exp_avg), ("exp_avg_sq", self.opt.exp_avg_sq)):
                target[k][i] = state[name].to(self.device) if state else 0.0
        st = self.models_state[i]
        try:
            st.shuffle_gen.set_state(ckpt["rng"]["shuffle"])
            st.noise_gen.set_state(ckpt["rng"]["noise"])
        except RuntimeError as exc:
            raise ValueError(f"model {i}: its checkpoint's noise generator was not drawn on "
                             f"{st.noise_gen.device} ({exc}); resume it where it started") from None
        self.epoch, self.step_count, self.opt.t = epoch, step, step


def train_stacked(configs: list[TrainConfig], epochs: int | None = None, run_ids: list[str] | None = None,
                  device: str | torch.device = "cpu", exact_noise: bool | None = None,
                  trainer: StackedTrainer | None = None) -> list[pd.DataFrame]:
    """Train the stack for `epochs` (default: the configs' shared epochs), recording metrics at
    log_epochs(epochs) exactly as train.train would; one tidy table per config, in order.

    A model whose epoch loss turns NaN or infinite is marked failed (trainer.models_state[i].failed),
    frozen, and keeps the rows recorded before it, while the others carry on.
    """
    st = trainer or StackedTrainer(configs, run_ids, device, exact_noise)
    epochs = st.configs[0].epochs if epochs is None else epochs
    schedule = [e for e in log_epochs(epochs) if e > st.epoch]
    while st.epoch < epochs:
        st.mark_failures(st.train_epoch())
        if schedule and st.epoch == schedule[0]:
            schedule.pop(0)
            st.record()
    return st.frames()


def train_runs(configs: list[TrainConfig], paths: list[str], device: str | torch.device = "cpu",
               exact_noise: bool | None = None) -> list[dict]:
    """train.train for N run folders at once, as one stack: each folder gets what its own
    train(cfg, path, resume=True) writes (config, environment, metrics rows and checkpoints at
    log_epochs, status), and a partial run resumes from its last checkpoint (every run of the
    stack must have stopped at the same epoch). Returns one {"path", "state", "epoch"[, "reason"]}
    per run; a diverged run is marked failed and frozen while the others go on.
    """
    runs = [RunDir(p) for p in paths]
    st = StackedTrainer(configs, [r.run_id for r in runs], device, exact_noise)
    for i, (cfg, run) in enumerate(zip(configs, runs)):
        ckpt, rows = resume_point(cfg, run)
        if ckpt is not None:
            st.load_state(i, ckpt)
            st.rows[i] = rows
        elif st.epoch:
            raise ValueError(f"{run.path} has no checkpoint but the stack resumes from epoch {st.epoch}")
        write_json(run.config, cfg.to_dict())
        write_json(run.env, environment())
        run.set_status("running", epoch=st.epoch)
    epochs = st.configs[0].epochs
    schedule = [e for e in log_epochs(epochs) if e > st.epoch]
    start = time.perf_counter()
    while st.epoch < epochs and bool(st.active.any()):
        for i in st.mark_failures(st.train_epoch()):
            runs[i].set_status("failed", reason=st.models_state[i].failed, epoch=st.epoch)
        if schedule and st.epoch == schedule[0]:
            schedule.pop(0)
            st.record()
            for i, run in enumerate(runs):  # rows first, then the checkpoint, as train.checkpoint
                if not st.models_state[i].failed:
                    write_table(run.metrics, rows_to_frame(st.rows[i]))
                    save_checkpoint(run.checkpoint_path(st.epoch), st.state(i))
    wall = round(time.perf_counter() - start, 3)
    out = []
    for run, ms in zip(runs, st.models_state):
        if ms.failed:
            out.append({"path": str(run.path), "state": "failed", "epoch": st.epoch, "reason": ms.failed})
        else:
            run.set_status("complete", epoch=st.epoch, wall_s=wall, stacked=st.n)
            out.append({"path": str(run.path), "state": "complete", "epoch": st.epoch})
    return out
