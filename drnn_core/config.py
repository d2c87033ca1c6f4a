"""Model hyperparameters: one frozen, keyword-only, validated object."""

from __future__ import annotations

import dataclasses
import math

from drnn_core.errors import ConfigError

SAMPLERS = ("uniform", "popularity")
# Pooling of a basket's item embeddings into the input of a basket step.
BASKET_POOLINGS = ("mean", "max")
NEGATIVE_MODES = ("sum", "hardest")
OPTIMIZERS = ("sgd", "adagrad")

# An SGD step that would move any parameter beyond this magnitude is skipped as
# diverging. With |X|, |U|, |W|, |V| <= 1e6 and h <= 4096, every sum the kernels
# form (b(t), h . V, the gradients) stays below 1e16, far from the float32
# maximum of 3.4e38, so the hidden states stay finite too.
MAX_ABS_PARAMETER = 1e6


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Hyperparameters of the recurrent BPR model.

    Attributes
    ----------
    hidden_size : int
        h, the size of the hidden state and of the item embeddings (default 64).
    window : int
        K, the number of recent items kept per user and the depth of truncated
        backpropagation through time (default 4).
    learning_rate : float
        SGD step size, or Adagrad's base step size (default 0.2).
    l2 : float
        lambda, the L2 penalty on every parameter an update touches (default 1e-5).
    max_grad_norm : float
        The gradient of one event is rescaled so that its global L2 norm is at
        most this value (default 5.0).
    sampler : str
        Negative sampler: "uniform" over known items, or "popularity" with
        probability proportional to count**alpha (default "uniform").
    popularity_alpha : float
        The exponent of the popularity sampler (default 0.75).
    init_scale : float
        Standard deviation of the initial normal weights (default 0.1).
    initial_items : int
        Item capacity allocated at start; it doubles when more items arrive
        (default 1024).
    seed : int
        Seed of the weight initialisation and of the negative sampler (default 42).
    negatives : int
        Negatives drawn per event, from 1 to 256 (default 64).
    negative_mode : str
        "sum": the loss sums one BPR term per negative; "hardest": only the
        best-scored draw gives a BPR term (default "sum").
    optimizer : str
        "sgd", or "adagrad" with one accumulator per X or V row (row-wise), per
        element of U and W, and per item bias (default "adagrad").
    item_bias : bool
        Add a learned bias c[i] to every item's score, so that a user with an
        all-zero state still gets a popularity-like ranking (default True).
    recurrent_learning_rate_scale : float
        Factor on the learning rate of U and W, in [0, 100] (default 1.0).
    adagrad_initial_accumulator : float
        Starting value of every Adagrad accumulator, in [0, 1e6]; it bounds the
        first steps at ``learning_rate / sqrt(value)`` per unit of gradient
        (default 0.1).
    tie_embeddings : bool
        Use one item embedding for input and output (X = V), as DREAM does
        (default True).
    """

    hidden_size: int = 64
    window: int = 4
    learning_rate: float = 0.2
    l2: float = 1e-5
    max_grad_norm: float = 5.0
    sampler: str = "uniform"
    popularity_alpha: float = 0.75
    init_scale: float = 0.1
    initial_items: int = 1024
    seed: int = 42
    negatives: int = 64
    negative_mode: str = "sum"
    optimizer: str = "adagrad"
    item_bias: bool = True
    recurrent_learning_rate_scale: float = 1.0
    adagrad_initial_accumulator: float = 0.1
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        _check_int("hidden_size", self.hidden_size, 1, 4096)
        _check_int("window", self.window, 1, 64)
        _check_float("learning_rate", self.learning_rate, 0.0, math.inf, low_open=True)
        _check_float("l2", self.l2, 0.0, math.inf)
        _check_float("max_grad_norm", self.max_grad_norm, 0.0, math.inf, low_open=True)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_float("popularity_alpha", self.popularity_alpha, 0.0, 2.0)
        _check_float("init_scale", self.init_scale, 0.0, 10.0, low_open=True)
        _check_int("initial_items", self.initial_items, 1, 1 << 30)
        _check_int("seed", self.seed, 0, (1 << 63) - 1)
        _check_int("negatives", self.negatives, 1, 256)
        _check_choice("negative_mode", self.negative_mode, NEGATIVE_MODES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_bool("item_bias", self.item_bias)
        _check_bool("tie_embeddings", self.tie_embeddings)
        _check_float("recurrent_learning_rate_scale", self.recurrent_learning_rate_scale, 0.0, 100.0)
        _check_float("adagrad_initial_accumulator", self.adagrad_initial_accumulator, 0.0, 1e6)


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"Invalid {name}={value!r}: expected true or false")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"Invalid {name}={value!r}: expected one of {', '.join(choices)}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Invalid {name}={value!r}: expected an integer from {low} to {high}")
    if not low <= value <= high:
        raise ConfigError(f"Invalid {name}={value}: expected an integer from {low} to {high}")


def _check_float(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> None:
    if math.isinf(high):
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"Invalid {name}={value!r}: expected {allowed}")
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        raise ConfigError(f"Invalid {name}={value!r}: expected {allowed}")
