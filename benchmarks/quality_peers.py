"""Peer attribution libraries, each through its own public API, on a Sieve run's checkpoints and
data (optional extra ``peers``). Used by ``benchmarks.quality``; one peer per child process:

    python -m benchmarks.quality_peers SPEC.json

SPEC names the store, the run, the peer, the LDS target ids and where to write the result
(``result.json`` + ``scores.npz``). A peer yields, in Sieve's sign (score > 0 = beneficial):

- ``score`` (n_train,): attribution against the summed validation loss (the run's
  ``targets.split``), timed end to end from the checkpoint files (the peer's own per-sample
  gradients, caches and factor fits included): ``seconds``;
- ``matrix`` (n_train, n_targets): train x target attributions for the LDS targets (timed
  separately: ``pairwise_seconds``).

Signs (read from each library's code, not fitted to the data): every peer here already returns
Sieve's sign, so none is negated. captum's TracInCP(Fast) and dattri's TracIn return
``sum_c lr_c g_train . g_test`` (proponents positive); dattri's influence attributors return
``g_train^T H^-1 g_test`` (dattri drops Koh & Liang's minus); kronfluence's pairwise scores with
a loss measurement are ``g_measure^T H^-1 g_train`` (positive helps); TRAK (traker and dattri)
scores positive when the train sample raises the target's margin. A negative LOO or LDS
correlation for a peer is therefore reported as measured, not flipped.

Settings follow Sieve's estimator of the same family where the library has the knob: the
influence peers get ``weight_decay + 0.01`` as their damping (Sieve's absolute default before
its damping became relative to the curvature, ``estimators/damping.py``: on digits-mlp the
relative default is 0.0101, on digits-logreg 0.0011); TRAK peers project to 512 dims (Sieve's ``k``)
on the final checkpoint; TracIn peers use every checkpoint with Sieve's learning rates.
Everything runs on the CPU in float32 with one torch thread.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

DAMPING = 0.01  # Sieve's influence-function damping default (added to the weight decay)
TRAK_K = 512  # Sieve's TRAK projection dimension default


@dataclass
class PeerInputs:
    """What every peer sees: the run's model factory, checkpoints and data (float32 rows)."""

    factory: Callable[[], nn.Module]
    checkpoints: list[tuple[str, float]]  # (state_dict path, Sieve's lr_c), model 0, in order
    train_ids: np.ndarray
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    target_ids: np.ndarray
    target_x: torch.Tensor
    target_y: torch.Tensor
    weight_decay: float
    seed: int
    workdir: Path

    @property
    def final(self) -> str:
        return self.checkpoints[-1][0]

    def state(self, path: str) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    def model_at(self, path: str) -> nn.Module:
        model = self.factory()
        model.load_state_dict(self.state(path))
        return model.eval()

    @property
    def features(self) -> int:
        return int(self.train_x.shape[1])


def loader(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> DataLoader:
    """An unshuffled loader of (x, y) batches; one batch holding everything by default."""
    return DataLoader(TensorDataset(x, y), batch_size=batch or len(y), shuffle=False)


@dataclass
class Peer:
    """A peer method: ``prepare`` builds the library's attributor (caches, factors, train
    features); ``pairwise(state, x, y)`` returns its (n_train, m) attributions for targets
    (x, y); ``summed(state)`` the (n_train,) scores against the summed validation loss
    (default: ``pairwise`` over the validation rows, summed over them; every peer here is
    linear in the target). ``sign`` maps the library's sign onto Sieve's."""

    name: str
    library: str
    family: str  # Sieve's estimator of the same family (for the time ratio)
    prepare: Callable[[PeerInputs], object]
    pairwise: Callable[[object, PeerInputs, torch.Tensor, torch.Tensor], np.ndarray]
    summed: Callable[[object, PeerInputs], np.ndarray] | None = None
    sign: float = 1.0
    settings: str = ""


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64).cpu().numpy()
    return np.asarray(t, dtype=np.float64)


def _last_linear(model: nn.Module) -> nn.Module:
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("model has no nn.Linear layer for a last-layer method")
    return linear[-1]


# --- captum -------------------------------------------------------------------------------------


def _captum_load(inp: PeerInputs) -> Callable[[nn.Module, str], float]:
    lrs = dict(inp.checkpoints)

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(inp.state(path))
        model.eval()
        return lrs[path]  # captum multiplies each checkpoint's dot products by this

    return load


def _captum_tracincp(inp: PeerInputs):
    from captum.influence import TracInCP

    return TracInCP(
        inp.factory(), loader(inp.train_x, inp.train_y, 256),
        checkpoints=[p for p, _ in inp.checkpoints], checkpoints_load_func=_captum_load(inp),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=256,
        sample_wise_grads_per_batch=True,
    )


def _captum_tracincp_fast(inp: PeerInputs):
    from captum.influence import TracInCPFast

    model = inp.factory()
    return TracInCPFast(
        model, _last_linear(model), loader(inp.train_x, inp.train_y, 256),
        checkpoints=[p for p, _ in inp.checkpoints], checkpoints_load_func=_captum_load(inp),
        loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=256,
    )


def _captum_pairwise(tracin, inp: PeerInputs, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return _np(tracin.influence((x, y))).T  # captum: (m, n_train)


def _captum_summed(tracin, inp: PeerInputs) -> np.ndarray:
    return _np(tracin.influence((inp.val_x, inp.val_y), aggregate=True)).reshape(-1)


# --- dattri -------------------------------------------------------------------------------------


def _dattri_loss(reduction: str = "mean") -> Callable[[nn.Module, int], Callable]:
    """Cross-entropy in dattri's ``f(params, data)`` style over every row ``data`` holds (one
    row for a sample, all rows for a batch or a bundle)."""

    def make(model: nn.Module, features: int) -> Callable:
        def loss(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, (x.reshape(-1, features),))
            return F.cross_entropy(out, y.reshape(-1).long(), reduction=reduction)

        return loss

    return make


def _dattri_task(inp: PeerInputs, paths: list[str], make_loss=None, make_target=None):
    """dattri's AttributionTask over ``paths`` (losses close over the task's own model).
    Default: the mean training loss, and the summed loss of a target (one row: its loss; a
    bundle of the validation rows: the summed validation loss)."""
    from dattri.task import AttributionTask

    model = inp.factory().eval()
    loss = (make_loss or _dattri_loss("mean"))(model, inp.features)
    target = (make_target or _dattri_loss("sum"))(model, inp.features)
    return AttributionTask(loss_func=loss, target_func=target, model=model,
                           checkpoints=[inp.state(p) for p in paths])


def bundle(inp: PeerInputs) -> DataLoader:
    """One 'test sample' holding every validation row: with a target function summed over its
    rows, dattri scores the summed validation loss in one pass (one inverse-Hessian product
    instead of one per row; the attributions are linear in the target, so this equals the sum
    of the per-row attributions)."""
    return DataLoader(TensorDataset(inp.val_x[None], inp.val_y[None]), batch_size=1)


def wrapped(inp: PeerInputs) -> PeerInputs:
    """The same model with its root module one level down (``nn.Sequential(model)``, state
    keys prefixed ``0.``): for module-based peers that cannot address a root-level layer
    (logistic regression is a bare ``nn.Linear``). Identical outputs and gradients."""
    if list(inp.factory().named_children()):
        return inp
    factory, state = inp.factory, inp.state

    class Wrapped(PeerInputs):
        def state(self, path: str) -> dict[str, torch.Tensor]:
            return {f"0.{k}": v for k, v in state(path).items()}

    fields = {k: getattr(inp, k) for k in PeerInputs.__dataclass_fields__}
    fields["factory"] = lambda: nn.Sequential(factory())
    return Wrapped(**fields)


def _dattri_if(cls_name: str, wrap: bool = False, **kwargs) -> Callable[[PeerInputs], object]:
    def prepare(inp: PeerInputs):
        import dattri.algorithm as algorithm

        cls = getattr(algorithm, cls_name)
        if wrap:
            inp = wrapped(inp)
        # EK-FAC fits its Fisher on the task's *target* function, which must stay the mean loss
        task = (_dattri_task(inp, [inp.final], make_target=_dattri_loss("mean")) if wrap
                else _dattri_task(inp, [inp.final]))
        options = {k: (v(inp) if callable(v) else v) for k, v in kwargs.items()}
        attributor = cls(task=task, device="cpu", **options)
        attributor.cache(loader(inp.train_x, inp.train_y))
        return attributor

    return prepare


def _dattri_pairwise(att, inp: PeerInputs, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return _np(att.attribute(loader(inp.train_x, inp.train_y), loader(x, y)))


def _dattri_summed(att, inp: PeerInputs) -> np.ndarray:
    with torch.no_grad():
        return _np(att.attribute(loader(inp.train_x, inp.train_y), bundle(inp)))[:, 0]


def _dattri_tracin(inp: PeerInputs):
    from dattri.algorithm import TracInAttributor

    task = _dattri_task(inp, [p for p, _ in inp.checkpoints])
    return TracInAttributor(
        task=task, weight_list=torch.tensor([lr for _, lr in inp.checkpoints]),
        normalized_grad=False, projector_kwargs={"proj_dim": TRAK_K, "device": "cpu"},
        device="cpu",
    )


def _dattri_tracin_pairwise(att, inp: PeerInputs, x: torch.Tensor, y: torch.Tensor):
    return _np(att.attribute(loader(inp.train_x, inp.train_y, 256), loader(x, y, 256)))


def _dattri_tracin_summed(att, inp: PeerInputs) -> np.ndarray:
    return _np(att.attribute(loader(inp.train_x, inp.train_y, 256), bundle(inp)))[:, 0]


def _margin(model: nn.Module, features: int) -> Callable:
    """TRAK's model output in dattri's style: sum over rows of logit_y - logsumexp(others)."""

    def output(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x.reshape(-1, features),))
        y = y.reshape(-1).long()
        true = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
        return (true - others).sum()

    return output


def _dattri_trak(inp: PeerInputs):
    from dattri.algorithm import TRAKAttributor

    task = _dattri_task(inp, [inp.final], make_loss=_margin, make_target=_margin)
    model, f = task.get_model(), inp.features

    def probability(params, data):  # p(y | x); TRAK's Q = 1 - p
        x, y = data
        logits = torch.func.functional_call(model, params, (x.reshape(-1, f),))
        return torch.exp(-F.cross_entropy(logits, y.reshape(-1).long()))

    attributor = TRAKAttributor(
        task=task, correct_probability_func=probability, device="cpu",
        projector_kwargs={"proj_dim": TRAK_K, "device": "cpu"},
    )
    attributor.cache(loader(inp.train_x, inp.train_y, 256))
    return attributor


def _dattri_trak_pairwise(att, inp: PeerInputs, x: torch.Tensor, y: torch.Tensor):
    with torch.no_grad():
        return _np(att.attribute(loader(x, y, 256)))


def _dattri_trak_summed(att, inp: PeerInputs) -> np.ndarray:
    with torch.no_grad():
        return _np(att.attribute(bundle(inp)))[:, 0]


# --- traker (the official TRAK) -------------------------------------------------------------------


@dataclass
class _Traker:
    traker: object
    state: dict
    experiments: int = 0


def _traker(inp: PeerInputs) -> _Traker:
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    model = inp.factory().eval()
    d = sum(p.numel() for p in model.parameters())
    # traker's default block size (100 columns): with one block (block_size = proj_dim) traker
    # 0.3.2 frees the matrix in finalize_features and never regenerates it for scoring
    projector = BasicProjector(
        grad_dim=d, proj_dim=TRAK_K, seed=inp.seed, proj_type=ProjectionType.rademacher,
        device=torch.device("cpu"), dtype=torch.float32,
    )
    traker = TRAKer(
        model=model, task="image_classification", train_set_size=len(inp.train_y),
        save_dir=str(Path(tempfile.mkdtemp(dir=inp.workdir, prefix="trak-"))),
        device="cpu", projector=projector,
        use_half_precision=False, logging_level=40,
    )
    state = inp.state(inp.final)
    traker.load_checkpoint(state, model_id=0)
    for x, y in loader(inp.train_x, inp.train_y, 256):
        traker.featurize(batch=(x, y), num_samples=len(y))
    traker.finalize_features()
    return _Traker(traker, state)


def _traker_pairwise(t: _Traker, inp: PeerInputs, x: torch.Tensor, y: torch.Tensor):
    t.experiments += 1
    name = f"targets{t.experiments}"
    t.traker.start_scoring_checkpoint(exp_name=name, checkpoint=t.state, model_id=0,
                                      num_targets=len(y))
    for xb, yb in loader(x, y, 256):
        t.traker.score(batch=(xb, yb), num_samples=len(yb))
    return _np(torch.as_tensor(np.asarray(t.traker.finalize_scores(exp_name=name))))


# --- kronfluence --------------------------------------------------------------------------------


@dataclass
class _Kron:
    analyzer: object
    train: object
    runs: int = 0


def _kronfluence(inp: PeerInputs) -> _Kron:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    class Classification(Task):
        """Summed cross-entropy; the true Fisher samples labels from the model (kronfluence's
        recipe); the measurement is the target's loss, so positive scores help."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    y = torch.multinomial(probs, 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = Classification()
    model = prepare_model(wrapped(inp).model_at(inp.final), task)
    analyzer = Analyzer(analysis_name="sieve", model=model, task=task, cpu=True,
                        output_dir=str(Path(tempfile.mkdtemp(dir=inp.workdir, prefix="kron-"))),
                        disable_tqdm=True)
    train = TensorDataset(inp.train_x, inp.train_y)
    analyzer.fit_all_factors(factors_name="ekfac", dataset=train,
                             factor_args=FactorArguments(strategy="ekfac"),
                             per_device_batch_size=256, overwrite_output_dir=True)
    return _Kron(analyzer, train)


def _kron_pairwise(k: _Kron, inp: PeerInputs, x: torch.Tensor, y: torch.Tensor):
    k.runs += 1
    name = f"scores{k.runs}"
    k.analyzer.compute_pairwise_scores(
        scores_name=name, factors_name="ekfac", query_dataset=TensorDataset(x, y),
        train_dataset=k.train, per_device_query_batch_size=256,
        per_device_train_batch_size=256, overwrite_output_dir=True)
    scores = k.analyzer.load_pairwise_scores(scores_name=name)["all_modules"]  # (m, n_train)
    return _np(scores).T


def _lam(inp: PeerInputs) -> float:
    return inp.weight_decay + DAMPING


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("captum.TracInCP", "captum", "tracin", _captum_tracincp, _captum_pairwise,
         _captum_summed, settings="all checkpoints, Sieve's lr_c, all parameters"),
    Peer("captum.TracInCPFast", "captum", "tracin", _captum_tracincp_fast, _captum_pairwise,
         settings="all checkpoints, last linear layer only"),
    Peer("dattri.TracIn", "dattri", "tracin", _dattri_tracin, _dattri_tracin_pairwise,
         _dattri_tracin_summed,
         settings="all checkpoints, Sieve's lr_c, dattri's 512-dim random projection"),
    Peer("dattri.IF-explicit", "dattri", "if_exact",
         _dattri_if("IFAttributorExplicit", regularization=_lam), _dattri_pairwise,
         _dattri_summed,
         settings="exact Hessian + (wd + 0.01) I, final checkpoint"),
    Peer("dattri.IF-CG", "dattri", "if_cg",
         _dattri_if("IFAttributorCG", regularization=_lam, max_iter=100), _dattri_pairwise,
         _dattri_summed,
         settings="Hessian CG, 100 iterations, + (wd + 0.01) I"),
    Peer("dattri.IF-LiSSA", "dattri", "if_lissa",
         _dattri_if("IFAttributorLiSSA", batch_size=128, recursion_depth=1000, scaling=50.0,
                    damping=lambda inp: _lam(inp) / 50.0), _dattri_pairwise, _dattri_summed,
         settings="depth 1000, batch 128, scale 50, effective damping wd + 0.01"),
    Peer("dattri.IF-Arnoldi", "dattri", "if_arnoldi",
         _dattri_if("IFAttributorArnoldi", proj_dim=50, max_iter=100, regularization=_lam),
         _dattri_pairwise, _dattri_summed,
         settings="100 Arnoldi iterations, top 50, + (wd + 0.01) I"),
    Peer("dattri.DataInf", "dattri", "datainf",
         _dattri_if("IFAttributorDataInf", regularization=_lam), _dattri_pairwise,
         _dattri_summed,
         settings="per-layer lambda = wd + 0.01"),
    Peer("dattri.EK-FAC", "dattri", "if_ekfac",
         _dattri_if("IFAttributorEKFAC", wrap=True, damping=_lam), _dattri_pairwise,
         settings="empirical Fisher, damping wd + 0.01, all linear modules"),
    Peer("dattri.TRAK", "dattri", "trak", _dattri_trak, _dattri_trak_pairwise,
         _dattri_trak_summed,
         settings="final checkpoint, k = 512, margin output"),
    Peer("traker.TRAKer", "trak", "trak", _traker, _traker_pairwise,
         settings="final checkpoint, k = 512, CPU BasicProjector (Rademacher), float32"),
    Peer("kronfluence.EK-FAC", "kronfluence", "if_ekfac", _kronfluence, _kron_pairwise,
         settings="EK-FAC, sampled-label Fisher, kronfluence's default damping heuristic, "
                  "all linear modules"),
)}


def peer_names(spec: str) -> list[str]:
    """``all``, ``none`` or a comma list (case-insensitive) -> peer names; KeyError if unknown."""
    if spec == "all":
        return list(PEERS)
    if spec == "none":
        return []
    lookup = {name.lower(): name for name in PEERS}
    names = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.lower() not in lookup:
            raise KeyError(f"unknown peer {item!r}; known: {', '.join(PEERS)}")
        names.append(lookup[item.lower()])
    return names


def importable(library: str) -> str | None:
    """None when ``library`` imports, else a one-line reason (checked without importing it)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(library)
    except (ImportError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None if found is not None else f"not installed (no module named {library!r})"


# --- child process --------------------------------------------------------------------------------


def load_inputs(store: str, run_id: str, target_ids: list[int], workdir: Path) -> PeerInputs:
    """The run's data and checkpoints, as the evaluation used them."""
    from storage.checkpoints import read_checkpoint_index
    from storage.store import Store
    from tasks.config import load_resolved_config
    from tasks.workload import load_workload

    run = Store(store).existing_run(run_id)
    config = load_resolved_config(run.config)
    work = load_workload(run, config)
    records = [r for r in read_checkpoint_index(run.checkpoints_dir) if r.model == 0]
    train = work.rows("train")
    val = work.rows(config.targets.split)
    test = work.rows("test")
    ids = np.sort(np.asarray(target_ids, dtype=np.int64))
    index = {int(s): r for s, r in zip(work.samples.sample_id[test], test, strict=True)}
    target = np.array([index[int(i)] for i in ids], dtype=np.int64)
    return PeerInputs(
        factory=work.factory,
        checkpoints=[(r.path, float(r.lr)) for r in records],
        train_ids=work.samples.sample_id[train].astype(np.int64),
        train_x=work.x[train], train_y=work.y[train],
        val_x=work.x[val], val_y=work.y[val],
        target_ids=ids, target_x=work.x[target], target_y=work.y[target],
        weight_decay=config.train.weight_decay, seed=config.seed, workdir=workdir,
    )


def measure(peer: Peer, inp: PeerInputs) -> dict:
    """Run ``peer``: (summed scores, seconds), then (pairwise matrix, seconds)."""
    started, cpu = time.perf_counter(), time.process_time()
    state = peer.prepare(inp)
    summed = (peer.summed(state, inp) if peer.summed is not None
              else peer.pairwise(state, inp, inp.val_x, inp.val_y).sum(axis=1))
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu
    started = time.perf_counter()
    matrix = peer.pairwise(state, inp, inp.target_x, inp.target_y)
    pairwise_seconds = time.perf_counter() - started
    n, m = len(inp.train_ids), len(inp.target_ids)
    summed = np.asarray(summed, dtype=np.float64).reshape(-1)
    matrix = np.asarray(matrix, dtype=np.float64)
    if summed.shape != (n,) or matrix.shape != (n, m):
        raise ValueError(f"{peer.name} returned shapes {summed.shape}, {matrix.shape}; "
                         f"expected ({n},), ({n}, {m})")
    if not (np.isfinite(summed).all() and np.isfinite(matrix).all()):
        raise ValueError(f"{peer.name} returned non-finite scores")
    return {"score": peer.sign * summed, "matrix": peer.sign * matrix, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "pairwise_seconds": pairwise_seconds}


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(spec.get("seed", 0))
    result: dict = {"peer": spec["peer"]}
    try:
        peer = PEERS[spec["peer"]]
        inp = load_inputs(spec["store"], spec["run_id"], spec["target_ids"], out)
        measured = measure(peer, inp)
        np.savez(out / "scores.npz", train_ids=inp.train_ids, target_ids=inp.target_ids,
                 score=measured["score"], matrix=measured["matrix"])
        result |= {k: measured[k] for k in ("seconds", "cpu_seconds", "pairwise_seconds")}
        result["ok"] = True
    except BaseException as e:  # noqa: BLE001 - any failure of a peer is its row's reason
        result |= {"ok": False, "error": one_line(e), "traceback": traceback.format_exc()}
    (out / "result.json").write_text(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
