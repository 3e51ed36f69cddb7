"""Attribution quality: Sieve's estimators and peer libraries judged against the same retrains.

    python -m benchmarks.quality [--quick] [--store DIR] [--estimators all|a,b]
                                 [--peers all|none|a,b] [--workloads digits-logreg,digits-mlp]
                                 [--ensemble K]

For each workload it runs Sieve's counterfactual evaluation (``flows.evaluate.evaluate``, what
``sieve evaluate`` runs: LOO, LDS, noisy-label detection, prune-and-retrain against random
removal; retrains are cached in the store, default ``./benchmark-store``, so a second run reuses
them), then runs each importable peer (``benchmarks.quality_peers``: captum, dattri, traker,
kronfluence, the optional extra ``peers``) through its own API on the same checkpoints and data
in a child process with a time-out, and scores the peer with Sieve's metric functions against
the same retrain outcomes. A peer's prune gain retrains its own pruned set (the run's prune-curve
seeds, cached in the store). One table per workload; a peer that fails gets a row
``failed: <reason>``. Results also go to ``<store>/quality-latest.json``.

Seconds: Sieve's are the score stage's, per estimator, over per-sample gradients already stored
by the gradients stage (that stage's time is printed under the table, shared by every
gradient-based estimator); a peer's are end to end through its API from the checkpoint files,
for the same summed-validation-loss scores, one torch thread each. ``time × Sieve`` is the
peer's seconds over those of Sieve's estimator of the same family and, for a family that reads
stored gradients, over those plus the whole gradients stage (an upper bound on Sieve's
end-to-end cost: that stage also computes the test-target gradients and every checkpoint's).

Workloads: digits-logreg, digits-mlp (the default MLP) and, only when named,
digits-relu-mlp (issue 15's external 64-128-10 ReLU MLP, ``benchmarks/external_mlp.py``) and
digits-logreg-lbfgs (the logistic regression fitted to convergence by ``train.optimizer:
lbfgs``, its retrains too: issue 15's convex setting, where damping 0 is the exact influence
function and the fixed- and fresh-seed protocols agree).

``--ensemble K`` adds rows ``sieve <name> ×K``: a second ``sieve evaluate`` of the same workload
with ``train.models=K`` (every estimator that reads a model averages its scores over K
independently trained models, ``estimators/model_ensemble.py``), judged on the same retrains
(the retrain cache key excludes ``train.models``). Their seconds include the K - 1 extra models'
per-sample gradients (computed in the score stage); the training of all K models is printed
under the table beside that of one. Peers stay on model 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.external_mlp import OVERRIDES as EXTERNAL_MLP

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE = "benchmark-store"
WORKLOADS: dict[str, list[str]] = {
    "digits-logreg": ["model.name=logreg"],
    "digits-mlp": [],  # the default MLP
    "digits-relu-mlp": EXTERNAL_MLP,  # issue 15's external workload (not run by default)
    "digits-logreg-lbfgs": ["model.name=logreg", "train.optimizer=lbfgs"],  # converged fits
}
DEFAULT_WORKLOADS = "digits-logreg,digits-mlp"
# Everything else is `sieve evaluate`'s default protocol (LOO 50 x 3 seeds, LDS 64 subsets x
# 2 seeds over 100 test targets); only the 10 % point of the prune curve is reported.
FULL = ["evaluate.prune_curve.fractions=[0.1]"]
QUICK = [
    "train.epochs=4", "train.checkpoints=2",
    "evaluate.loo.samples=8", "evaluate.loo.seeds=1",
    "evaluate.lds.subsets=5", "evaluate.lds.seeds=1", "evaluate.lds.targets=6",
    "evaluate.prune_curve.fractions=[0.1]", "evaluate.prune_curve.seeds=1",
]
QUICK_ESTIMATORS = "tracin,if_exact"
QUICK_PEERS = "captum.TracInCP,kronfluence.EK-FAC"
QUICK_WORKLOADS = "digits-logreg"
PRUNE_Q = 0.10


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny settings (one workload, 2 estimators, few retrains): seconds")
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"store folder, retrains cached across runs (default ./{DEFAULT_STORE})")
    p.add_argument("--estimators", default=None,
                   help=f"'all' or a comma list (default: all; --quick: {QUICK_ESTIMATORS})")
    p.add_argument("--peers", default=None,
                   help=f"'all', 'none' or a comma list (default: all; --quick: {QUICK_PEERS})")
    p.add_argument("--workloads", default=None,
                   help=f"comma list of {', '.join(WORKLOADS)} (default: {DEFAULT_WORKLOADS}; "
                        f"--quick: {QUICK_WORKLOADS})")
    p.add_argument("--peer-timeout", type=float, default=None,
                   help="seconds per peer before it is stopped (default 300; --quick 60)")
    p.add_argument("--peer-memory-gb", type=float, default=16.0,
                   help="address-space limit of a peer's process (default 16 GiB)")
    p.add_argument("--no-peer-prune", action="store_true",
                   help="don't retrain peers' pruned sets (their prune gain reads 'not run')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Sieve config override for every workload")
    p.add_argument("--ensemble", type=int, default=1, metavar="K",
                   help="also evaluate Sieve with train.models=K (rows 'sieve <name> ×K')")
    p.add_argument("--json", help="also write the results here")
    return p


def _estimator_overrides(spec: str) -> list[str]:
    if spec == "all":
        return ["estimators=all"]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    by = "tracin" if "tracin" in names else names[0]
    return [f"estimators=[{','.join(names)}]", f"prune.by={by}"]


# --- Sieve --------------------------------------------------------------------------------------


def read_evaluation(path: Path) -> dict[str, dict[str, float]]:
    from storage.atomic import read_parquet_table

    table: dict[str, dict[str, float]] = {}
    for row in read_parquet_table(path).to_pylist():
        table.setdefault(row["estimator"], {})[row["metric"]] = row["value"]
    return table


def _stage_seconds(run, stage: str) -> float | None:
    from storage.metrics import read_metrics

    values = [m["value"] for m in read_metrics(run.metrics).to_pylist()
              if m["stage"] == stage and m["name"] == "seconds" and m["estimator"] is None]
    return float(values[-1]) if values else None


def truth_check(truth, names: list[str], table: dict
                ) -> tuple[float, dict[str, dict[str, np.ndarray]]]:
    """(largest difference between evaluation.parquet and Sieve's stored scores re-judged with
    this module's ground truth (LOO, LDS): 0 means peers face exactly Sieve's truth; the
    per-target LDS of every estimator with train x test attributions, ``per_target_lds``)."""
    from benchmarks.quality_truth import (
        align,
        metrics,
        per_target_lds,
        stored_attributions,
        stored_scores,
    )

    worst = 0.0
    targets: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        ids, score = stored_scores(truth.run, truth.config, name)
        try:
            train, target_ids, matrix = stored_attributions(truth.run, name)
            mine = metrics(truth, train, align(ids, score, train), matrix, target_ids)
            if len(truth.membership) >= 3:
                targets[name] = per_target_lds(truth, train, matrix, target_ids)
        except KeyError:  # an estimator without train x test attributions
            mine = metrics(truth, ids, score)
        for key in ("loo_pearson", "loo_spearman", "lds", "lds_fresh"):
            a, b = mine.get(key), table[name].get(key)
            if a is not None and b is not None and np.isfinite(a) and np.isfinite(b):
                worst = max(worst, abs(a - b))
    return worst, targets


def paired_with_best_peer(truth, sieve: dict[str, dict[str, np.ndarray]],
                          peers: dict[str, dict[str, np.ndarray]], scores: dict[str, float]
                          ) -> dict | None:
    """Each Sieve row's per-target LDS (fresh-seed when the run has it) minus that of the peer
    with the best mean (``scores``: peer -> mean), paired over the targets: {"peer", "metric",
    "targets", "rows": {row: [mean, low, high]}}; None without a scored peer."""
    from benchmarks.quality_truth import paired_difference

    key = "lds_fresh" if truth.fresh is not None else "lds"
    ranked = [p for p in peers if np.isfinite(scores.get(p, np.nan))]
    if not ranked or not sieve:
        return None
    best = max(ranked, key=lambda p: scores[p])
    rows = {name: list(paired_difference(values[key], peers[best][key]))
            for name, values in sieve.items()}
    return {"peer": best, "metric": key, "targets": int(len(truth.target_ids)), "rows": rows}


# --- peers --------------------------------------------------------------------------------------


def _limit_memory(gb: float):
    def apply() -> None:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_peer(name: str, store: str, run_id: str, target_ids: np.ndarray, workdir: Path,
             timeout: float, memory_gb: float) -> dict:
    """Run one peer in a child process; {"ok": True, seconds, score, matrix, ...} or
    {"ok": False, "error": one line}."""
    from benchmarks.quality_peers import PEERS, importable

    peer = PEERS[name]
    base = {"peer": name, "library": peer.library, "family": peer.family,
            "settings": peer.settings}
    missing = importable(peer.library)
    if missing:
        return base | {"ok": False, "error": missing}
    out = workdir / name
    spec = workdir / f"{name}.json"
    spec.write_text(json.dumps({"store": store, "run_id": run_id, "peer": name,
                                "target_ids": [int(i) for i in target_ids], "out": str(out)}))
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.quality_peers", str(spec)], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=timeout,
            preexec_fn=_limit_memory(memory_gb),
        )
    except subprocess.TimeoutExpired:
        return base | {"ok": False, "error": f"time-out after {timeout:g} s"}
    wall = time.perf_counter() - started
    result_path = out / "result.json"
    if not result_path.exists():
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:160]
        why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else "exited"
        return base | {"ok": False,
                       "error": f"process {why} {proc.returncode}: {tail}".strip(" :")}
    result = json.loads(result_path.read_text())
    if not result.get("ok"):
        error = result.get("error", "unknown error")
        if "MemoryError" in error or "allocate" in error:
            error = f"out of memory under the {memory_gb:g} GiB limit (--peer-memory-gb): {error}"
        return base | {"ok": False, "error": error,
                       "traceback": result.get("traceback")}
    with np.load(out / "scores.npz") as z:
        arrays = {k: z[k] for k in ("train_ids", "target_ids", "score", "matrix")}
    return base | {"ok": True, "seconds": result["seconds"],
                   "cpu_seconds": result.get("cpu_seconds"),
                   "pairwise_seconds": result["pairwise_seconds"], "process_seconds": wall,
                   **arrays}


def judge_peer(truth, result: dict, q: float | None) -> dict:
    """Sieve's metrics for a peer's scores; prune gain at ``q`` unless q is None."""
    from benchmarks.quality_truth import metrics, prune_gain

    row = metrics(truth, result["train_ids"], result["score"], result["matrix"],
                  result["target_ids"])
    if q is not None:
        accuracy, gain, trained = prune_gain(truth, result["train_ids"], result["score"], q)
        row |= {f"prune_accuracy@{q}": accuracy, f"prune_gain@{q}": gain,
                "prune_retrains_trained": trained}
    return row


# --- the table ----------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _lds(row: dict, key: str = "lds") -> str:
    if key not in row or not np.isfinite(row[key]):
        return "–"
    return f"{row[key]:.3f} [{_fmt(row.get(key + '_low'))}, {_fmt(row.get(key + '_high'))}]"


def _seconds(row: dict) -> str:
    """Summed-target seconds, then the train x test (pairwise) seconds when known."""
    pairwise = row.get("pairwise_seconds")
    return _fmt(row.get("seconds"), 2) + ("" if pairwise is None else f" / {pairwise:.2f}")


def table_rows(result: dict) -> list[list[str]]:
    """The printed rows: Sieve's estimators, then the peers (ok or failed)."""
    q = result["prune_q"]
    rows = []
    sieve = result["sieve"]
    for name in result["estimators"]:
        r = sieve[name]
        gain = r.get(f"prune_gain@{q}")
        rows.append([f"sieve {name}", _lds(r), _lds(r, "lds_fresh"), _fmt(r.get("loo_pearson")),
                     _fmt(r.get("loo_spearman")), _fmt(r.get("detection_auc")),
                     _fmt(None if gain is None else 100 * gain, 2), _seconds(r), ""])
    ensemble = result.get("ensemble")
    for name in ensemble["estimators"] if ensemble else ():
        r = ensemble["sieve"][name]
        gain = r.get(f"prune_gain@{q}")
        rows.append([f"sieve {name} ×{ensemble['models']}", _lds(r), _lds(r, "lds_fresh"),
                     _fmt(r.get("loo_pearson")), _fmt(r.get("loo_spearman")),
                     _fmt(r.get("detection_auc")), _fmt(None if gain is None else 100 * gain, 2),
                     _seconds(r), ""])
    for p in result["peers"]:
        if not p["ok"]:
            rows.append([p["peer"], f"failed: {p['error']}", "–", "–", "–", "–", "–", "–", "–"])
            continue
        r = p["metrics"]
        gain = r.get(f"prune_gain@{q}")
        family = sieve.get(p["family"], {}).get("seconds")
        if family and family > 0:
            ratio = f"{p['seconds'] / family:.1f}× {p['family']}"
            grads = result.get("gradients_seconds")
            if p["family"] in result.get("gradient_estimators", ()) and grads:
                ratio += f" ({p['seconds'] / (family + grads):.1f}× with gradients)"
        else:
            ratio = f"– ({p['family']} not run)"
        rows.append([p["peer"], _lds(r), _lds(r, "lds_fresh"), _fmt(r.get("loo_pearson")),
                     _fmt(r.get("loo_spearman")), _fmt(r.get("detection_auc")),
                     "not run" if gain is None else _fmt(100 * gain, 2),
                     _seconds(p), ratio])
    return rows


def _short(cell: str, limit: int = 90) -> str:
    """A table cell cut to ``limit`` characters (failure reasons are printed whole below)."""
    return cell if len(cell) <= limit else cell[: limit - 1] + "…"


COLUMNS = ["estimator", "LDS (95% CI)", "fresh-seed LDS (95% CI)", "LOO Pearson",
           "LOO Spearman", "detection AUC", "prune gain @10% vs random (pts)",
           "seconds (summed target / pairwise)", "time × Sieve"]


def print_result(result: dict, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{result['workload']}: run {result['run_id']} "
                        f"({result['evaluate_seconds']:.0f} s evaluation)")
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "estimator" else "right",
                         overflow="fold")
    for row in table_rows(result):
        table.add_row(*(escape(_short(cell)) for cell in row))
    console.print(table)
    q = result["prune_q"]
    grad = result.get("gradients_seconds")
    console.print(
        f"test accuracy: full data {100 * result['full_accuracy']:.2f}%, random removal of "
        f"{100 * q:g}% {100 * result['random_accuracy']:.2f}%; Sieve's gradients stage "
        f"{_fmt(grad, 1)} s (shared by the gradient-based estimators, not in their seconds); "
        f"ground truth re-check {result['truth_check']:.1e}"
    )
    ensemble = result.get("ensemble")
    if ensemble:
        console.print(
            f"×{ensemble['models']} rows: run {ensemble['run_id']} (train.models="
            f"{ensemble['models']}, {ensemble['evaluate_seconds']:.0f} s evaluation); training "
            f"{ensemble['models']} models {_fmt(ensemble['train_seconds'], 1)} s (1 model: "
            f"{_fmt(result.get('train_seconds'), 1)} s); gradients stage (model 0) "
            f"{_fmt(ensemble['gradients_seconds'], 1)} s; the other models' gradients are in "
            f"the rows' seconds; ground truth re-check against the peers' "
            f"{ensemble['truth_check']:.1e}"
        )
    failed = [p for p in result["peers"] if not p["ok"]]
    ran = [f"{p['peer']} {p['cpu_seconds'] / p['seconds']:.2f}" if p.get("cpu_seconds")
           else p["peer"] for p in result["peers"] if p["ok"]]
    console.print("peers run (CPU/wall of the timed part; ~1.00 = it had a core to itself): "
                  f"{', '.join(ran) or 'none'}")
    paired = result.get("paired")
    if paired:
        what = "fresh-seed LDS" if paired["metric"] == "lds_fresh" else "LDS"
        rows = "; ".join(f"sieve {name} {mean:+.3f} [{low:+.3f}, {high:+.3f}]"
                         for name, (mean, low, high) in paired["rows"].items())
        console.print(f"paired over the {paired['targets']} targets, {what} minus the best "
                      f"peer's ({paired['peer']}), mean [95% CI]: {rows}")
    for p in failed:
        console.print(escape(f"peer failed: {p['peer']}: {p['error']}"))
    console.print()


# --- main ---------------------------------------------------------------------------------------


def run_workload(name: str, overrides: list[str], store, peers: list[str], args,
                 workdir: Path) -> dict:
    from benchmarks.quality_truth import load_ground_truth, per_target_lds
    from estimators.registry import make_estimator
    from flows.evaluate import evaluate
    from tasks.config import load_config
    from tasks.train import preflight

    config = preflight(load_config(None, overrides))
    run_id = store.new_run_id()
    started = time.perf_counter()
    evaluate(config=config, store=str(store.root), run_id=run_id)
    evaluate_seconds = time.perf_counter() - started
    run = store.existing_run(run_id)
    table = read_evaluation(run.evaluation)
    estimators = [e.name for e in config.estimators]
    fractions = config.evaluate.prune_curve.fractions
    q = min(fractions, key=lambda f: abs(f - PRUNE_Q))
    truth = load_ground_truth(str(store.root), run_id)
    check, sieve_targets = truth_check(truth, estimators, table)
    ensemble = (evaluate_ensemble(overrides, store, args.ensemble, truth, estimators)
                if args.ensemble > 1 else None)
    if ensemble:
        sieve_targets |= {f"{e} ×{args.ensemble}": v
                          for e, v in ensemble.pop("per_target").items()}
    peer_targets: dict[str, dict[str, np.ndarray]] = {}
    timeout = args.peer_timeout or (60.0 if args.quick else 300.0)
    peer_rows = []
    for peer in peers:
        started = time.perf_counter()
        print(f"[quality] {name}: peer {peer} ...", file=sys.stderr, flush=True)
        result = run_peer(peer, str(store.root), run_id, truth.target_ids, workdir, timeout,
                          args.peer_memory_gb)
        if result["ok"]:
            try:
                result["metrics"] = judge_peer(truth, result, None if args.no_peer_prune
                                               else q)
                if len(truth.membership) >= 3:
                    peer_targets[peer] = per_target_lds(truth, result["train_ids"],
                                                        result["matrix"], result["target_ids"])
            except Exception as e:  # noqa: BLE001 - a peer's bad output is its row's reason
                from benchmarks.quality_peers import one_line

                result = {k: v for k, v in result.items()
                          if k not in ("score", "matrix")} | {"ok": False,
                                                              "error": one_line(e)}
        for key in ("score", "matrix", "train_ids", "target_ids"):
            result.pop(key, None)
        status = "ok" if result["ok"] else f"failed: {result['error']}"
        print(f"[quality] {name}: peer {peer} {status} ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr, flush=True)
        peer_rows.append(result)
    key = "lds_fresh" if truth.fresh is not None else "lds"
    paired = paired_with_best_peer(
        truth, sieve_targets, peer_targets,
        {p["peer"]: p["metrics"].get(key, np.nan) for p in peer_rows if p["ok"]})
    return {
        "workload": name, "run_id": run_id, "overrides": overrides,
        "evaluate_seconds": evaluate_seconds, "estimators": estimators,
        "sieve": {e: table[e] for e in estimators}, "peers": peer_rows, "prune_q": q,
        "full_accuracy": table["full_data"]["test_accuracy"],
        "random_accuracy": table["random_removal"][f"prune_accuracy@{q}"],
        "gradients_seconds": _stage_seconds(run, "gradients"), "truth_check": check,
        "train_seconds": _stage_seconds(run, "train"), "ensemble": ensemble,
        "gradient_estimators": [e.name for e in config.estimators
                                if make_estimator(e.name, **e.options).needs.gradients],
        "n_train": int(len(truth.train_ids)), "lds_subsets": int(len(truth.membership)),
        "lds_targets": int(len(truth.target_ids)), "loo_samples": int(len(truth.loo_ids)),
        "paired": paired,
    }


def evaluate_ensemble(overrides: list[str], store, models: int, truth, estimators: list[str]
                      ) -> dict:
    """``sieve evaluate`` of the same workload with ``train.models=models``; its rows judged
    (re-check) against ``truth``, the single-model run's ground truth that peers face."""
    import dataclasses

    from flows.evaluate import evaluate
    from tasks.config import load_config

    config = load_config(None, [*overrides, f"train.models={models}"])
    run_id = store.new_run_id()
    print(f"[quality] ensemble of {models} models: run {run_id} ...", file=sys.stderr,
          flush=True)
    started = time.perf_counter()
    evaluate(config=config, store=str(store.root), run_id=run_id)
    seconds = time.perf_counter() - started
    run = store.existing_run(run_id)
    table = read_evaluation(run.evaluation)
    check, per_target = truth_check(dataclasses.replace(truth, run=run), estimators, table)
    return {"models": models, "run_id": run_id, "evaluate_seconds": seconds,
            "per_target": per_target,
            "estimators": estimators, "sieve": {e: table[e] for e in estimators},
            "train_seconds": _stage_seconds(run, "train"),
            "gradients_seconds": _stage_seconds(run, "gradients"), "truth_check": check}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.ensemble < 1:
        print("error: --ensemble must be >= 1", file=sys.stderr)
        return 2
    from benchmarks.quality_peers import peer_names

    workloads = [w.strip() for w in (args.workloads or (QUICK_WORKLOADS if args.quick
                                                        else DEFAULT_WORKLOADS)).split(",")]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown workload(s) {unknown}; known: {list(WORKLOADS)}", file=sys.stderr)
        return 2
    try:
        peers = peer_names(args.peers or (QUICK_PEERS if args.quick else "all"))
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    estimators = args.estimators or (QUICK_ESTIMATORS if args.quick else "all")

    from flows.environment import configure
    from storage.store import Store

    store = Store(args.store)
    store.root.mkdir(parents=True, exist_ok=True)
    configure(store.root)  # before Prefect is imported
    import torch
    from rich.console import Console

    from storage.errors import BadInput

    torch.set_num_threads(1)
    console = Console() if Console().is_terminal else Console(width=200)
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sieve-quality-") as tmp:
        for name in workloads:
            overrides = [*WORKLOADS[name], *(QUICK if args.quick else FULL),
                         *_estimator_overrides(estimators), *args.set]
            try:
                result = run_workload(name, overrides, store, peers, args, Path(tmp))
            except BadInput as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            results.append(result)
            print_result(result, console)
    doc = {"command": " ".join(["python -m benchmarks.quality", *(argv or sys.argv[1:])]),
           "quick": args.quick, "store": str(store.root),
           "seconds": time.perf_counter() - started, "workloads": results}
    text = json.dumps(doc, indent=1, default=float)
    (store.root / "quality-latest.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    console.print(f"total {doc['seconds']:.0f} s; results in {store.root / 'quality-latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
