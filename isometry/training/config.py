"""Configuration of a training run: :class:`TrainConfig`, :class:`RunConfig`, :func:`parse_clip`.

Both are frozen dataclasses (hashable, JSON via ``to_dict``/``from_dict``);
a bad field is a ``ValueError``/``TypeError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import optax
from flax import nnx

from isometry import atomic, networks, validate
from isometry import data as _data

__all__ = [
    "CLIPS",
    "OPTIMIZERS",
    "SCHEDULES",
    "RunConfig",
    "TrainConfig",
    "field_values",
    "is_transformation",
    "model_config_dict",
    "parse_clip",
]

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
SCHEDULES = ("constant", "cosine", "linear", "exponential")
CLIPS = ("none", "global_norm", "value", "agc")


CUSTOM = "custom"


def is_transformation(x) -> bool:
    """``x`` is an optax ``GradientTransformation`` (a user's clipping or optimizer)."""
    return isinstance(x, optax.GradientTransformation | optax.GradientTransformationExtraArgs)


def parse_clip(spec: str) -> tuple[str, float | None]:
    """``"none"`` | ``"global_norm:C"`` | ``"value:C"`` | ``"agc:C"`` -> ``(kind, C)``."""
    if spec == CUSTOM:
        raise ValueError(
            "clip 'custom' stands for an optax transformation, which JSON cannot hold: "
            "pass the transformation itself (TrainConfig(clip=optax....))"
        )
    if not isinstance(spec, str):
        raise TypeError(
            "clip must be a string like 'global_norm:1.0' or an optax GradientTransformation, "
            f"got {spec!r}"
        )
    kind, _, value = spec.strip().partition(":")
    kind = kind.strip().lower().replace("-", "_")
    validate.choice("clip", kind, CLIPS)
    if kind == "none":
        if value:
            raise ValueError(f"clip 'none' takes no threshold, got {spec!r}")
        return "none", None
    try:
        c = float(value)
    except ValueError as err:
        raise ValueError(f"clip must be '{kind}:THRESHOLD' with a number, got {spec!r}") from err
    validate.real_array("clip threshold", c, minimum=0.0, strict=True)
    return kind, c


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run (frozen, hashable; JSON via ``to_dict``/``from_dict``).

    Attributes:
        steps: number of updates.
        batch_size: training examples per update (an epoch drops the remainder).
        optimizer: ``sgd``, ``momentum`` (heavy ball, ``momentum``), ``rmsprop``
            (``decay``, ``eps``) or ``adam`` (``b1``, ``b2``, ``eps``); or any
            optax ``GradientTransformation`` mapping gradients to updates (it
            carries its own learning rate: ``learning_rate``, ``schedule`` and
            the optimizer constants are then unused, except that the logged
            ``lr`` still follows them).
        learning_rate: the peak learning rate ``eta``.
        schedule: ``constant``, ``cosine``, ``linear`` or ``exponential`` decay
            from ``eta`` to ``final_lr_fraction * eta`` over the steps after warm-up.
        warmup_steps: linear warm-up from 0 to ``eta``.
        final_lr_fraction: end of the decay, as a fraction of ``eta`` (in ``(0, 1]``
            for ``exponential``).
        momentum, decay, b1, b2, eps: optimizer constants.
        weight_decay: decoupled weight decay added to the update (0 = off).
        clip: ``"none"``, ``"global_norm:C"``, ``"value:C"`` or ``"agc:C"``;
            or any stateless optax ``GradientTransformation`` applied to the
            gradients first (it is re-applied to log the clipped norm).
            ``to_dict`` writes a transformation as ``"custom"``, which
            ``from_dict`` refuses: a run with one is resumed by passing it again.
        agc_eps: ``eps`` of adaptive clipping (floor of the parameter norm).
        seed: seed of the data order (and, in :func:`isometry.training.run`, of the
            initialization).
        log_every: log training metrics every this many steps (and at the last).
        eval_every: evaluate on the held-out split every this many steps (0 = only at the end).
        probe_every: Jacobian probe every this many steps (0 = off).
        probe_inputs: held-out inputs of the Jacobian probe.
        checkpoint_every: orbax checkpoint every this many steps (and at the end).
        keep_checkpoints: checkpoints kept on disk.
        eval_batch_size: chunk size of evaluation.
    """

    steps: int = 1000
    batch_size: int = 128
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.01
    momentum: float = 0.9
    decay: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip: str = "none"
    agc_eps: float = 1e-3
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    probe_every: int = 100
    probe_inputs: int = 4
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_batch_size: int = 1024

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            validate.positive_int(name, getattr(self, name))
        for name in ("eval_every", "probe_every", "warmup_steps"):
            validate.positive_int(name, getattr(self, name), minimum=0)
        validate.positive_int("probe_inputs", self.probe_inputs)
        validate.positive_int("eval_batch_size", self.eval_batch_size)
        validate.positive_int("seed", self.seed, minimum=0)
        if not is_transformation(self.optimizer):
            if self.optimizer == CUSTOM:
                raise ValueError(
                    "optimizer 'custom' stands for an optax transformation, which JSON cannot "
                    "hold: pass the transformation itself (TrainConfig(optimizer=optax....))"
                )
            validate.choice("optimizer", self.optimizer, OPTIMIZERS)
        validate.choice("schedule", self.schedule, SCHEDULES)
        validate.real_array("learning_rate", self.learning_rate, minimum=0.0, strict=True)
        validate.real_array("final_lr_fraction", self.final_lr_fraction, minimum=0.0, maximum=1.0)
        if self.schedule == "exponential" and self.final_lr_fraction <= 0:
            raise ValueError("final_lr_fraction must be > 0 for the exponential schedule")
        for name in ("momentum", "decay", "b1", "b2"):
            validate.real_array(name, getattr(self, name), minimum=0.0, maximum=1.0)
        validate.real_array("eps", self.eps, minimum=0.0)
        validate.real_array("weight_decay", self.weight_decay, minimum=0.0)
        validate.real_array("agc_eps", self.agc_eps, minimum=0.0, strict=True)
        if not is_transformation(self.clip):
            kind, c = parse_clip(self.clip)
            object.__setattr__(self, "clip", kind if c is None else f"{kind}:{c:g}")

    def to_dict(self) -> dict:
        """The fields as JSON values; an optax transformation is written as ``"custom"``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: CUSTOM if is_transformation(v) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**_known_fields(cls, d, "TrainConfig"))


def _known_fields(cls, d, owner) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{owner}: unknown field(s) {', '.join(unknown)}; known: {sorted(names)}")
    return dict(d)


def field_values(cls, values) -> dict:
    """The entries of the mapping ``values`` that name fields of the dataclass ``cls`` and
    are not ``None`` (e.g. the command-line flags of a :class:`TrainConfig`)."""
    return {
        f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None
    }


def model_config_dict(cfg) -> dict | None:
    """A model config dataclass as a JSON-able dict (``None`` if it is not a dataclass)."""
    if dataclasses.is_dataclass(cfg):
        d = dataclasses.asdict(cfg)
        if not isinstance(d.get("activation", ""), str):
            d["activation"] = getattr(d["activation"], "name", repr(d["activation"]))
        return d
    return None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Dataset + MLP + training: everything a run needs, as one JSON-able config.

    ``model.in_dim``/``model.out_dim`` left ``None`` are filled from the data.
    ``dataset`` is one of :data:`isometry.data.DATASETS`; ``data_dir`` the
    local directory of file datasets; ``data_options`` keyword arguments of
    the loader (e.g. ``{"n_train": 2048}`` for the teacher-student task).
    """

    model: networks.MLPConfig
    train: TrainConfig = TrainConfig()
    dataset: str = "digits"
    data_dir: str | None = None
    data_options: tuple = ()

    def __post_init__(self):
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", networks.MLPConfig(**self.model))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainConfig.from_dict(self.train))
        if isinstance(self.data_options, dict):
            object.__setattr__(self, "data_options", tuple(sorted(self.data_options.items())))
        else:
            object.__setattr__(self, "data_options", tuple(tuple(p) for p in self.data_options))
        validate.choice("dataset", self.dataset, _data.DATASETS)

    def to_dict(self) -> dict:
        return {
            "model": model_config_dict(self.model),
            "train": self.train.to_dict(),
            "dataset": self.dataset,
            "data_dir": self.data_dir,
            "data_options": dict(self.data_options),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = _known_fields(cls, d, "RunConfig")
        if "model" not in d:
            raise ValueError("RunConfig: 'model' (the MLPConfig fields) is required")
        return cls(**d)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the config as JSON (atomically); :meth:`from_json` reads it back."""
        return atomic.write_json(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RunConfig:
        """Read a config written by :meth:`to_json`; errors name the file and what is wrong."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                "a run config is an object with 'model', 'train', 'dataset', ..."
            ) from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a text (JSON) file") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a run config must be a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err}") from None

    def load_data(self) -> _data.Dataset:
        return _data.load(
            self.dataset, root=self.data_dir, seed=self.train.seed, **dict(self.data_options)
        ).flatten()

    def build_model(self, ds: _data.Dataset) -> networks.MLP:
        m = self.model
        m = dataclasses.replace(
            m,
            in_dim=ds.in_dim if m.in_dim is None else m.in_dim,
            out_dim=ds.out_dim if m.out_dim is None else m.out_dim,
        )
        return networks.MLP(m, rngs=nnx.Rngs(self.train.seed))
