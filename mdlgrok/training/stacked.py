"""Many models of one architecture trained together in one process (one GPU, or one core).

N runs that differ only in seed and in element-wise settings (weight decay, gamma, sigma,
noise kind, lr, betas, Adam eps) share every shape, so their parameters stack into one
tensor per parameter name with a leading model axis. One step is then one vmapped forward
and backward (``torch.func.stack_module_state`` + ``functional_call`` + ``vmap``), one
batched spectral penalty and one element-wise AdamW update for all N models.

Each model sees exactly what its own single engine (training/single.py) would: its own seeded split, its own
shuffle generator (seed + 1), its own noise generator (seed + 2, the same draws in the same
order as ``WeightNoise``) and its own init (``torch.manual_seed(seed)`` then ``build_model``).
On CPU the metrics equal N separate runs to float tolerance (tests/test_stacked.py).

    from mdlgrok.training import train_runs
    train_runs([TrainConfig(task="add", seed=s, epochs=600) for s in range(8)],
               [f"runs/add-s{s}" for s in range(8)], engine="stacked")
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from torch.func import functional_call, stack_module_state, vmap

from mdlgrok.config import TrainConfig
from mdlgrok.regularizers import EmaGradFilter, draw_noise, effective_ranks, mean_spectral_entropy
from mdlgrok.tasks import epoch_batches
from mdlgrok.training.objective import task_loss
from mdlgrok.training.single import batch_size
from mdlgrok.training.start import initial_model, training_data

# Fields that must agree for models to share one stacked step: the architecture and the data
# shapes (split sizes, batch sizes, number of steps). Everything else is per model.
SHARED_FIELDS = (
    "task",
    "p",
    "frac",
    "model",
    "layers",
    "width",
    "attention",
    "pos_rows",
    "batch",
    "subset",
    "epochs",
    "loss",
    "dtype",
)


def stack_mismatch(configs: list[TrainConfig]) -> str | None:
    """Why `configs` cannot be trained as one stack, or None when they can."""
    if not configs:
        return "no configs to stack"
    first = configs[0]
    diff = [
        f"{name} ({', '.join(sorted({repr(getattr(c, name)) for c in configs}))})"
        for name in SHARED_FIELDS
        if any(getattr(c, name) != getattr(first, name) for c in configs)
    ]
    if diff:
        return (
            "stacked models must share architecture, task, split sizes, batch and epochs; "
            f"these differ: {'; '.join(diff)}"
        )
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


@dataclass
class ModelState:
    """Per-model bookkeeping of a stack: its config, data and generators."""

    cfg: TrainConfig
    data: object
    shuffle_gen: torch.Generator
    noise_gen: torch.Generator


class StackedEngine:
    """N runs of one architecture trained in lockstep; model i behaves as SingleEngine(configs[i]).

    device: where parameters and data live. exact_noise: draw each model's noise on its CPU
    generator, tensor by tensor, exactly as WeightNoise (the default on CPU); False draws one
    flat vector per model from a generator on `device` (seeded seed + 2; reproducible, but not
    the CPU stream: the default off CPU, where the CPU draws and copies would dominate a step).
    """

    def __init__(self, configs: list[TrainConfig], device: str | torch.device = "cpu", exact_noise: bool | None = None):
        check_stackable(configs)
        self.configs = list(configs)
        self.device = torch.device(device)
        self.exact_noise = self.device.type == "cpu" if exact_noise is None else exact_noise
        models, self.models_state = [], []
        noise_dev = "cpu" if self.exact_noise else self.device
        for cfg in configs:
            data = training_data(cfg)
            models.append(initial_model(cfg))  # the init of SingleEngine(cfg)
            self.models_state.append(
                ModelState(
                    cfg,
                    data,
                    torch.Generator().manual_seed(cfg.seed + 1),
                    torch.Generator(device=noise_dev).manual_seed(cfg.seed + 2),
                )
            )
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().to(self.device).requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: v.to(self.device) for k, v in buffers.items()}
        self.base = copy.deepcopy(models[0]).to("meta")  # shapes and code only; weights come from self.params
        self._eval_model = models[0].to(self.device)  # a real module, reloaded per model for evaluation
        self.n = len(configs)
        d = [m.data for m in self.models_state]
        for name in ("x_train", "y_train", "x_test", "y_test"):  # (N, n, 4) tokens and (N, n) targets
            setattr(self, name, torch.stack([getattr(x, name) for x in d]).to(self.device))
        self.batch = batch_size(configs[0], self.x_train.shape[1])
        self.loss_kind = configs[0].loss
        regs = [c.reg_config() for c in configs]
        dtype = next(iter(self.params.values())).dtype  # per-model scalars as the single engine's Python floats
        self.gamma = torch.tensor([r.gamma for r in regs], dtype=dtype, device=self.device)
        self.sigma = [r.sigma for r in regs]
        self.noise_kind = [r.noise for r in regs]
        self.opt = StackedAdamW(
            self.params,
            [c.lr for c in configs],
            [c.betas for c in configs],
            [c.adam_eps for c in configs],
            [r.wd for r in regs],
        )
        self.active = torch.ones(self.n, dtype=torch.bool, device=self.device)
        ema = [c.grad_filter == "ema" for c in configs]
        self.grad_filter = None
        if any(ema):  # lambda 0: a model without the filter
            self.grad_filter = EmaGradFilter(
                torch.tensor([c.grad_alpha for c in configs], dtype=dtype, device=self.device),
                torch.tensor(
                    [c.grad_lambda if e else 0.0 for c, e in zip(configs, ema)], dtype=dtype, device=self.device
                ),
            )
        self.epoch, self.step = 0, 0
        self.grad_hook = None  # grad_hook(engine): after backward, before the optimizer step

    # ----- one step -------------------------------------------------------------------------
    def _noise(self) -> dict[str, torch.Tensor] | None:
        """Per-model weight noise, stacked; None when no model uses noise."""
        if not any(self.sigma):
            return None
        if self.exact_noise:
            draws: dict[str, list[torch.Tensor]] = {k: [] for k in self.params}
            for i, st in enumerate(self.models_state):
                for k, p in self.params.items():  # model.parameters() order, as WeightNoise
                    shape = p.shape[1:]
                    draws[k].append(
                        draw_noise(shape, self.sigma[i], self.noise_kind[i], st.noise_gen, p.dtype)
                        if self.sigma[i]
                        else torch.zeros(shape, dtype=p.dtype)
                    )
            return {k: torch.stack(v).to(self.device) for k, v in draws.items()}
        sizes = [p[0].numel() for p in self.params.values()]
        dtype = next(iter(self.params.values())).dtype
        flat = torch.zeros(self.n, sum(sizes), dtype=dtype, device=self.device)
        for i, st in enumerate(self.models_state):
            if self.sigma[i]:
                flat[i] = draw_noise(sum(sizes), self.sigma[i], self.noise_kind[i], st.noise_gen, dtype, self.device)
        return {k: chunk.view(p.shape) for (k, p), chunk in zip(self.params.items(), flat.split(sizes, dim=1))}

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(N, B, 4) tokens -> (N, B, vocab) logits, model i with params[...][i]."""

        def one(p, b, xs):
            return functional_call(self.base, (p, b), (xs,))

        return vmap(one)(params, self.buffers, x)

    def losses(self, idx: torch.Tensor) -> torch.Tensor:
        """(N,) training losses (task loss + gamma_i * mean spectral entropy) on the minibatches
        idx (N, B), at the noisy point; gradients reach self.params."""
        noise = self._noise()
        params = self.params if noise is None else {k: p + noise[k] for k, p in self.params.items()}
        rows = torch.arange(self.n, device=self.device)[:, None]
        loss = task_loss(self.forward(params, self.x_train[rows, idx]), self.y_train[rows, idx], self.loss_kind)
        use = self.gamma > 0
        if bool(use.all()):
            # "gamma * mean over all matrices of H(W)"
            loss = loss + self.gamma * mean_spectral_entropy(params.values(), batch_dims=1)
        elif bool(use.any()):
            # only the models with a penalty compute it, as SingleEngine (which skips gamma == 0)
            sel = use.nonzero().squeeze(1)
            penalty = self.gamma[sel] * mean_spectral_entropy([v[sel] for v in params.values()], batch_dims=1)
            loss = loss.index_add(0, sel, penalty)
        return loss

    def train_step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every model on minibatches idx (N, B); returns the (N,) losses."""
        for p in self.params.values():
            p.grad = None
        loss = self.losses(idx)
        loss.sum().backward()  # model i's parameters receive only d loss_i
        if self.grad_filter:
            self.grad_filter({k: p.grad for k, p in self.params.items() if p.grad is not None})
        if self.grad_hook:
            self.grad_hook(self)
        self.opt.step(self._masks())
        self.step += 1
        return loss.detach()

    def _masks(self) -> dict[str, torch.Tensor | None]:
        """Which models update each parameter: all but the frozen (failed) ones."""
        all_active = bool(self.active.all())
        return {k: None if all_active else self.active for k in self.params}

    def train_epoch(self) -> list[float]:
        """One pass over each model's own shuffled minibatches; the N sums of the batch losses."""
        n_train = self.x_train.shape[1]
        batches = [epoch_batches(n_train, self.batch, st.shuffle_gen) for st in self.models_state]
        total = torch.zeros(self.n, device=self.device)
        for parts in zip(*batches):
            total += self.train_step(torch.stack(parts).to(self.device))
        self.epoch += 1
        return total.tolist()

    def freeze(self, i: int) -> None:
        """Stop updating model i (it diverged); the others go on."""
        self.active[i] = False

    # ----- models and metrics ---------------------------------------------------------------
    @torch.no_grad()
    def model(self, i: int) -> torch.nn.Module:
        """Model i as a real module (a fresh copy, on self.device)."""
        m = copy.deepcopy(self._eval_model)
        m.load_state_dict({k: v[i].detach() for k, v in self.params.items()})
        return m

    def data(self, i: int):
        return self.models_state[i].data

    @torch.no_grad()
    def metrics(self, chunk: int = 4096) -> list[dict[str, float]]:
        """objective.model_metrics of every model, batched over the stack without autograd: one
        vmapped forward per chunk of examples, one batched spectral decomposition per shape."""
        out: dict[str, torch.Tensor] = {}
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            loss_sum = torch.zeros(self.n, dtype=torch.float64, device=self.device)
            correct = torch.zeros(self.n, dtype=torch.int64, device=self.device)
            for xs, ys in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)):
                logits = self.forward(self.params, xs)
                loss_sum += task_loss(logits, ys, self.loss_kind).double() * ys.shape[1]
                correct += (logits.argmax(-1) == ys).sum(1)
            out[f"{split}_loss"] = loss_sum / y.shape[1]
            out[f"{split}_acc"] = correct.double() / y.shape[1]
        out["weight_norm"] = sum(p.double().pow(2).flatten(1).sum(1) for p in self.params.values()).sqrt()
        out["spectral_entropy"] = mean_spectral_entropy(self.params.values(), batch_dims=1)
        out["effective_rank"] = torch.stack(effective_ranks(self.params.values(), batch_dims=1), 1).mean(1)
        values = {k: v.tolist() for k, v in out.items()}  # in objective.model_metrics' order
        return [{k: float(v[i]) for k, v in values.items()} for i in range(self.n)]

    # ----- checkpoints: SingleEngine.state's format, so that either engine resumes the other's runs
    def state(self, i: int) -> dict:
        """Model i's checkpoint, exactly as SingleEngine.state() writes it (model, torch AdamW state, rng)."""
        cfg = self.models_state[i].cfg
        model = self.model(i).cpu()
        opt = torch.optim.AdamW(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.reg_config().wd
        )
        if self.opt.t:
            for k, p in model.named_parameters():
                opt.state[p] = {
                    "step": torch.tensor(float(self.opt.t)),
                    "exp_avg": self.opt.exp_avg[k][i].detach().cpu().clone(),
                    "exp_avg_sq": self.opt.exp_avg_sq[k][i].detach().cpu().clone(),
                }
        st = self.models_state[i]
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": {"shuffle": st.shuffle_gen.get_state(), "noise": st.noise_gen.get_state()},
            "epoch": self.epoch,
            "step": self.step,
            "config": json.dumps(cfg.to_dict()),
        }
        if cfg.grad_filter == "ema" and self.grad_filter.mu is not None:
            state["grad_filter"] = {k: v[i].detach().cpu().clone() for k, v in self.grad_filter.mu.items()}
        return state

    @torch.no_grad()
    def load_state(self, i: int, ckpt: dict) -> None:
        """Restore model i from a checkpoint of either engine; every model of a stack resumes from
        the same epoch and step (the optimizer's step count is shared)."""
        epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        if i and (epoch, step) != (self.epoch, self.step):
            raise ValueError(
                f"model {i} resumes from epoch {epoch}, step {step}, the stack from "
                f"epoch {self.epoch}, step {self.step}: stack runs that stopped at the same epoch"
            )
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
            raise ValueError(
                f"model {i}: its checkpoint's noise generator was not drawn on "
                f"{st.noise_gen.device} ({exc}); resume it where it started"
            ) from None
        self.epoch, self.step, self.opt.t = epoch, step, step
        if self.grad_filter and ckpt.get("grad_filter") is not None:
            if self.grad_filter.mu is None:  # the filter resumes: its averages exist for every model
                self.grad_filter.mu = {k: torch.zeros_like(p) for k, p in self.params.items()}
            for k, v in ckpt["grad_filter"].items():
                self.grad_filter.mu[k][i] = v.to(self.device)
