"""The configs: what a run trains (hashed into its key) and how its checkpoints are measured.

Each field is documented once, in its ``help`` metadata; the command line (`add_arguments`)
and the experiment files (`coerce`) are derived from the dataclass fields.

    TrainConfig(task="add", preset="ours", epochs=600)     # everything that changes the weights
    MeasureConfig(eps=(0.5,), measures=("complexity",))     # nothing that changes the weights
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from mdlgrok.complexity.estimate import PAPER_EPS  # the paper's tolerances, nats

GROKKED = 0.95  # test accuracy that counts as grokked
DTYPES = ("float32", "float64")
ESTIMATORS = ("mdlgrok", "paper")


def doc(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its one-line documentation."""
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """A run's resolved configuration: every field changes the weights, so all enter the run's key.
    None fields take the paper's value for the task."""

    task: str = doc("add", "add, sub, mul, div, sq (a^2+b^2) or quad (a^2+ab+b^2), mod p; or digits (8x8 images)")
    p: int = doc(113, "modulus (the paper's 113)")
    frac: float | None = doc(
        None, "train fraction (paper: add 0.2, sub 0.3, mul 0.2, div 0.3, sq 0.4, quad 0.6; digits: 1,000 images)"
    )
    model: str = doc("transformer", "transformer or mlp (modular tasks); dense (digits: a ReLU MLP on the pixels)")
    width: int | None = doc(None, "dense: hidden width (None: 200, Omnigrok's)")
    init_scale: float = doc(1.0, "every parameter multiplied by it at initialization (Omnigrok's alpha)")
    loss: str = doc("ce", "ce (cross-entropy, clipped at 1e-9 as the paper) or mse (squared error to one-hot targets)")
    dtype: str = doc("float32", "float32 or float64: weights, inputs and training arithmetic")
    layers: int | None = doc(None, "transformer blocks (paper: 2 for sub/div, 1 otherwise); dense: hidden layers (2)")
    attention: str = doc("paper", "paper (sum of values, as the paper ran) or softmax (standard)")
    pos_rows: int | None = doc(None, "positional table rows (None: p+2 as the paper; 4 suffices)")
    preset: str = doc("ours", "regularizers: none, wd or ours; explicit wd/gamma/sigma override it")
    wd: float | None = doc(None, "AdamW weight decay on all parameters (overrides the preset)")
    gamma: float | None = doc(None, "weight of the mean spectral entropy, nats (overrides the preset)")
    sigma: float | None = doc(None, "weight-noise scale: Gaussian std or uniform bin (overrides the preset)")
    noise: str = doc("gaussian", "gaussian (sigma is a std, the paper) or uniform (sigma is a bin)")
    lr: float = doc(1e-3, "AdamW learning rate (the paper's)")
    betas: tuple[float, float] = doc((0.9, 0.98), "AdamW betas (the paper's)")
    adam_eps: float = doc(1e-8, "AdamW epsilon (the paper's)")
    batch: int | None = doc(None, "minibatch (None: min(512, N_train // 2), the paper's; 0: full batch)")
    grad_filter: str = doc("none", "none, or ema: Grokfast's EMA filter on the gradients (Lee et al. 2024)")
    grad_alpha: float = doc(0.98, "EMA filter: decay alpha (Grokfast's code 0.98; its README 0.99)")
    grad_lambda: float = doc(2.0, "EMA filter: amplification lambda (Grokfast's code 2.0; its README 5.0)")
    init_from: str | None = doc(
        None, "start from another run's weights: RUN or RUN:EPOCH (default its last checkpoint)"
    )
    subset: int | None = doc(None, "train on a seeded subset of this many of the split's training examples")
    epochs: int = doc(10_000, "epochs (the paper's 10,000; its 'steps' are epochs)")
    seed: int = doc(0, "seeds the split, the init, the shuffles and the noise")

    def __post_init__(self):
        from mdlgrok.regularizers import preset as reg_preset
        from mdlgrok.tasks import PAPER_LAYERS
        from mdlgrok.training.objective import LOSSES

        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {list(self.betas)}")
        self.frac = self.task_config().frac  # validates task, p, frac
        if self.layers is None:
            self.layers = PAPER_LAYERS[self.task]
        base = reg_preset(self.preset, self.task)
        self.wd = base.wd if self.wd is None else self.wd
        self.gamma = base.gamma if self.gamma is None else self.gamma
        self.sigma = base.sigma if self.sigma is None else self.sigma
        self.reg_config()  # validates the regularizer weights
        self.model_config()
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch is not None and self.batch < 0:
            raise ValueError(f"batch must be non-negative (0 = full batch), got {self.batch}")
        if self.grad_filter not in ("none", "ema"):
            raise ValueError(f"unknown grad_filter {self.grad_filter!r}; choose none or ema")
        if not 0 <= self.grad_alpha < 1 or self.grad_lambda < 0:
            raise ValueError(
                f"EMA filter: alpha must lie in [0, 1) and lambda be >= 0, got {self.grad_alpha}, {self.grad_lambda}"
            )
        if (self.task == "digits") != (self.model == "dense"):
            raise ValueError(
                f"task {self.task} takes " + ("--model dense" if self.task == "digits" else "a token model")
            )
        if self.width is not None and self.model != "dense":
            raise ValueError(f"width is the hidden width of the dense model, not of a {self.model}")
        if self.loss not in LOSSES or self.dtype not in DTYPES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)} and dtype one of {', '.join(DTYPES)}")
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be a positive number of training examples, got {self.subset}")

    def task_config(self):
        from mdlgrok.tasks import TaskConfig

        return TaskConfig(self.task, self.p, self.frac, self.seed)

    def model_config(self):
        from mdlgrok.models import ModelConfig

        task = self.task_config()
        return ModelConfig(
            vocab=self.p + 2,
            model=self.model,
            layers=self.layers,
            attention=self.attention,
            pos_rows=self.pos_rows,
            classes=task.classes,
            width=200 if self.width is None else self.width,
            init_scale=self.init_scale,
        )

    def reg_config(self):
        from mdlgrok.regularizers import RegConfig

        return RegConfig(wd=self.wd, gamma=self.gamma, sigma=self.sigma, noise=self.noise)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """A config from its dict; a field this version does not know is an error (see runs.convert_run
        for the folders of older versions, whose configs held `measure` and `eps`)."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"unknown TrainConfig field(s) {', '.join(unknown)}"
                + ("; an older run folder: convert it with `mdlgrok convert`" if set(unknown) & LEGACY_FIELDS else "")
            )
        return cls(**d)


LEGACY_FIELDS = {"measure", "eps"}  # measure settings that older versions kept in the training config


@dataclass
class MeasureConfig:
    """How a run's checkpoints are measured; never part of a run's key."""

    eps: tuple[float, ...] = doc(PAPER_EPS, "complexity tolerances in nats")
    estimator: str = doc("mdlgrok", "mdlgrok (this package's search) or paper (the paper's Bayesian search)")
    measures: tuple[str, ...] = doc(("complexity",), "measures of each checkpoint: complexity, norms, llc, fourier")
    llc_lr: float = doc(1e-4, "LLC: SGLD step size")
    llc_gamma: float = doc(100.0, "LLC: localization strength")
    llc_nbeta: float | None = doc(None, "LLC: inverse temperature n_beta (None: B / ln B)")
    llc_chains: int = doc(2, "LLC: independent chains (their spread is reported)")
    llc_draws: int = doc(100, "LLC: draws per chain after burn-in")
    llc_burnin: int = doc(20, "LLC: steps per chain before the draws")
    llc_batch: int = doc(512, "LLC: minibatch size B")
    llc_seed: int = doc(0, "LLC: seed of the batches and the noise")

    def __post_init__(self):
        from mdlgrok.measures import MEASURES

        self.eps = tuple(float(e) for e in self.eps)
        if not self.eps or any(not (e > 0 and math.isfinite(e)) for e in self.eps):
            raise ValueError(f"every eps must be a positive finite number of nats, got {list(self.eps)}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; choose {' or '.join(ESTIMATORS)}")
        if self.llc_lr <= 0 or self.llc_gamma < 0 or min(self.llc_chains, self.llc_draws, self.llc_batch) < 1:
            raise ValueError("LLC options: lr must be positive, gamma non-negative, chains, draws and batch at least 1")
        if self.llc_burnin < 0 or (self.llc_nbeta is not None and self.llc_nbeta <= 0):
            raise ValueError("LLC options: burnin must be non-negative and nbeta positive")
        self.measures = tuple(self.measures)
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown or not self.measures:
            raise ValueError(
                f"unknown measure(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MEASURES)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- types, the command line, TOML
def field_kind(f) -> str:
    """'int', 'float', 'str', 'bool' or 'tuple-float' / 'tuple-str' for a config field."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if text.startswith("tuple"):
        return "tuple-str" if "str" in text else "tuple-float"
    return text.split(" ")[0].split("|")[0].strip()


def field_default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def coerce(cls, name: str, value: Any, where: str) -> Any:
    """A TOML value checked against the field's type (ints become floats for float fields)."""
    known = {f.name: f for f in fields(cls)}
    if name not in known:
        hint = "; it is a measure setting: put it in [measure]" if cls is TrainConfig and name in LEGACY_FIELDS else ""
        raise ValueError(f"{where}: unknown {cls.__name__} field {name!r}{hint}; known: {', '.join(known)}")
    kind = field_kind(known[name])
    if value is None:
        return None
    if kind.startswith("tuple"):
        item_ok = (lambda v: isinstance(v, str)) if kind == "tuple-str" else _is_number
        if not isinstance(value, (list, tuple)) or not all(item_ok(v) for v in value):
            raise ValueError(
                f"{where}: {name} must be a list of {'names' if kind == 'tuple-str' else 'numbers'}, got {value!r}"
            )
        return tuple(value) if kind == "tuple-str" else tuple(float(v) for v in value)
    if kind == "float":
        if not _is_number(value):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        return float(value)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {name} must be true or false, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string, got {value!r}")
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def canonical(cfg) -> dict:
    """cfg.to_dict() with every value coerced to its field's type, so `wd = 1` and `wd = 1.0` hash alike."""
    return {k: coerce(type(cfg), k, v, "config") for k, v in cfg.to_dict().items()}


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of cls, with its type, default and help."""
    for f in fields(cls):
        if f.name in skip:
            continue
        kind, default = field_kind(f), field_default(f)
        flag = "--" + f.name.replace("_", "-")
        shown = (
            ""
            if default is None
            else f" (default {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        )
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata.get("help", "") + shown}
        if kind.startswith("tuple"):
            kw.update(nargs=2 if f.name == "betas" else "+", type=str if kind == "tuple-str" else float)
        else:
            kw["type"] = {"int": int, "float": float}.get(kind, str)
        parser.add_argument(flag, **kw)


def given_arguments(cls, args: argparse.Namespace) -> dict:
    """The fields of cls whose flags (add_arguments) were given."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def from_arguments(cls, args: argparse.Namespace, **extra):
    """cls from the parsed flags of add_arguments: flags not given keep the field's default."""
    return cls(**{**given_arguments(cls, args), **extra})


# Config columns every gathered table carries beside run_id, so that it describes itself,
# and further scalar fields added as columns where they vary across the gathered runs.
CONFIG_COLUMNS = [
    "task",
    "p",
    "frac",
    "model",
    "layers",
    "attention",
    "preset",
    "wd",
    "gamma",
    "sigma",
    "seed",
    "epochs",
]
EXTRA_COLUMNS = [
    "pos_rows",
    "noise",
    "lr",
    "batch",
    "adam_eps",
    "grad_filter",
    "grad_lambda",
    "init_from",
    "subset",
    "width",
    "init_scale",
    "loss",
    "dtype",
]
# Options that are off at these values stay out of a run's key (sweep.spec.effective).
OFF_VALUES = {"init_from": None, "subset": None, "width": None, "init_scale": 1.0, "loss": "ce", "dtype": "float32"}
