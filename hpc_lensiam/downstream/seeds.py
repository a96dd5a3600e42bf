"""Seed-aware fine-tuning: one recipe over S seeds, and the paired comparison of two such runs.

``hpc-lensiam finetune ... --seeds 0,1,2 --json A.json`` runs :func:`hpc_lensiam.downstream.finetune.finetune`
once per seed (the seed sets the train/validation split, the head's init, the batch order and, for
``--backbone none``, the whole network's init) and reports each seed plus mean +- sd across seeds.
The JSON keeps every seed's test predictions. With ``--resume`` the seeds already in ``--json``
(same recipe, checked) are kept and only the missing ones run: the file is rewritten atomically
after every seed, so an interrupted run loses at most the seed in progress.

``hpc-lensiam compare A.json B.json`` pairs the two reports seed by seed on the same test set and
prints metric(A) - metric(B) with the hierarchical interval of
:func:`hpc_lensiam.evaluation.stats.hierarchical_paired_difference` (seeds and test images resampled
together). A single-seed report (``--seed``) counts as one seed. ``compare A_s0.json,A_s1.json
B_s0.json,B_s1.json`` compares backbones pretrained with several seeds: the pretraining seeds and the
fine-tuning seeds are then resampled as two levels (a backbone's fine-tunings share its luck).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_write_json, sha256_file
from ..evaluation.stats import hierarchical_paired_difference, seed_summary
from ..shards.manifest import MANIFEST_NAME
from .config import CompareConfig

FORMAT = "hpc_lensiam.finetune_seeds/1"
SUMMARY_KEYS = ("r2", "residual_sigma", "rmse", "bias", "auc")  # summarised where every seed has them


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; distinct integers, at least one."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip() != ""]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct comma-separated integers such as 0,1,2, got {text!r}")
    return seeds


def _metric(report: dict) -> str:
    """The headline metric of a fine-tuning report: AUC for a classifier, R^2 for a regression."""
    return "auc" if report.get("task") == "classify" or "auc" in report else "r2"


def _scores(report: dict) -> list:
    return report["test_scores"] if "test_scores" in report else report["test_predictions"]


def _recipe(kw: dict) -> dict:
    """Everything that makes two runs of one seed the same run: arguments and input file hashes."""
    recipe = {k: v for k, v in sorted(kw.items()) if k not in ("progress", "verify", "save_model")}
    for key in ("train_dir", "test_dir"):
        manifest = Path(kw[key]) / MANIFEST_NAME
        recipe[key + "_manifest_sha256"] = sha256_file(manifest) if manifest.is_file() else None
    backbone = Path(str(kw["backbone"]))
    recipe["backbone_sha256"] = sha256_file(backbone) if backbone.is_file() else None
    return recipe


def _combine(runs: list[dict], seeds: list[int], recipe: dict) -> dict:
    first = runs[0]
    keep = (
        "target",
        "unit",
        "task",
        "backbone",
        "arch",
        "init",
        "freeze_backbone",
        "n_train",
        "n_val",
        "n_test",
        "test_dir",
        "test_manifest_sha256",
        "test_targets",
    )
    out = {k: first[k] for k in keep if k in first}
    out.update(
        format=FORMAT,
        seeds=[r["seed"] for r in runs],
        seeds_requested=seeds,
        complete=sorted(r["seed"] for r in runs) == sorted(seeds),
        metric=_metric(first),
        recipe=recipe,
        summary={k: seed_summary(r[k] for r in runs) for k in SUMMARY_KEYS if all(k in r for r in runs)},
        runs=[{k: v for k, v in r.items() if k != "test_targets"} for r in runs],
    )
    return out


def finetune_seeds(seeds: list[int], out_json: str | None = None, resume: bool = False, **kw) -> dict:
    """Run ``finetune(**kw, seed=s)`` for every seed; per-seed reports plus mean +- sd across seeds.
    ``save_model=M`` saves each seed's model (``M.seedS.safetensors`` when there are several)."""
    from .finetune import finetune
    from .model_file import seed_path

    save_model = kw.pop("save_model", None)
    recipe = _recipe(kw)
    done: dict[int, dict] = {}
    if resume:
        if not out_json:
            raise UserError("--resume: needs --json (the file that holds the seeds already run)")
        if Path(out_json).is_file():
            old = _read_json(out_json, "--json")
            if old.get("format") != FORMAT:
                raise UserError(f"--json {out_json}: not a multi-seed fine-tuning report, cannot resume from it")
            if old.get("recipe") != recipe:
                diff = sorted(
                    k for k in set(recipe) | set(old.get("recipe", {})) if recipe.get(k) != old.get("recipe", {}).get(k)
                )
                raise UserError(
                    f"--resume: {out_json} was made by a different recipe (differs in: {', '.join(diff)});"
                    f" remove it or choose another --json"
                )
            done = {r["seed"]: {**r, "test_targets": old["test_targets"]} for r in old["runs"] if r["seed"] in seeds}
    by_seed = dict(done)
    for s in seeds:
        if s in by_seed:
            print(f"finetune: seed {s} already in {out_json}, kept", flush=True)
            continue
        model = seed_path(save_model, s, len(seeds)) if save_model else None
        by_seed[s] = finetune(seed=s, out_json=None, save_model=model, **kw)
        if out_json:  # after every seed: an interruption loses only the seed in progress
            atomic_write_json(out_json, _combine([by_seed[q] for q in seeds if q in by_seed], seeds, recipe))
    runs = [by_seed[q] for q in seeds]
    report = _combine(runs, seeds, recipe)
    if out_json:
        atomic_write_json(out_json, report)
    m = report["summary"][report["metric"]]
    print(
        f"finetune: {report['target']} {_label(report['metric'])} = {_mean_sd(m)} (mean +- sd over "
        f"{m['n']} seeds {', '.join(map(str, report['seeds']))}: {', '.join(f'{v:.3f}' for v in m['values'])})"
        + (f"; report {out_json}" if out_json else ""),
        flush=True,
    )
    return report


def _label(metric: str) -> str:
    return {"r2": "R^2", "auc": "ROC AUC"}.get(metric, metric)


def _mean_sd(s: dict) -> str:
    return f"{s['mean']:.3f} +- {s['sd']:.3f}" if s["sd"] is not None else f"{s['mean']:.3f} (one seed)"


# ---------------------------------------------------------------------------------------- compare
def _read_json(path: str, what: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path}: not a JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path}: not a fine-tuning report (a JSON object expected)")
    return data


def load_seed_report(path: str) -> dict:
    """A fine-tuning report (one seed or several) as {seeds, targets (n,), preds (S, n), ...}."""
    rep = _read_json(path, "compare:")
    runs = rep["runs"] if rep.get("format") == FORMAT else [rep]
    if "test_targets" not in rep or not runs or not all("test_predictions" in r or "test_scores" in r for r in runs):
        raise UserError(
            f"compare: {path}: not a fine-tuning report with test predictions (made by `hpc-lensiam finetune --json`)"
        )
    y = np.asarray(rep["test_targets"], np.float64)
    preds = np.asarray([_scores(r) for r in runs], np.float64)
    if preds.shape != (len(runs), len(y)):
        raise UserError(f"compare: {path}: predictions do not match its {len(y)} test targets")
    return {
        "path": str(path),
        "report": rep,
        "metric": _metric(runs[0]),
        "target": rep.get("target"),
        "seeds": [int(r["seed"]) for r in runs],
        "targets": y,
        "preds": preds,
        "test_manifest_sha256": rep.get("test_manifest_sha256"),
        "values": [float(r[_metric(runs[0])]) for r in runs],
    }


def compare(
    a_path=None,
    b_path=None,
    out_json: str | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
    config: CompareConfig | None = None,
) -> dict:
    """metric(A) - metric(B), paired by seed on the same test set, with the hierarchical 95% interval.

    ``a_path``/``b_path`` are one report each, or a list (or comma-separated string) of reports, one
    per pretraining seed of the backbone: ``A_s0.json,A_s1.json``. Then the runs are pretraining x
    fine-tuning seeds and both are resampled as levels (docs/statistics.md): fine-tuning seed f of
    A's i-th report pairs with seed f of B's i-th, or of B's only report (a random-init arm has no
    pretraining seed).
    """
    if config is None:  # the Python API's arguments (None: the config's default), validated once
        join = lambda p: None if p is None else (p if isinstance(p, str) else ",".join(map(str, p)))  # noqa: E731
        config = from_flags(
            CompareConfig, dict(a=join(a_path), b=join(b_path), json=out_json, n_boot=n_boot, seed=seed)
        )
    a_path, b_path, out_json, n_boot, seed = config.a, config.b, config.json, config.n_boot, config.seed
    a_paths, b_paths = (_paths(p) for p in (a_path, b_path))
    if len(b_paths) not in (1, len(a_paths)):
        raise UserError(
            f"compare: {len(a_paths)} report(s) for A but {len(b_paths)} for B: give B one report per A "
            f"report (its pretraining seeds), or one (a backbone without pretraining seeds)"
        )
    a_reps = [load_seed_report(p) for p in a_paths]
    b_reps = [load_seed_report(p) for p in b_paths]
    first = a_reps[0]
    rows_a, rows_b, levels = [], [], {"pretraining": [], "fine-tuning": []}
    for i, a in enumerate(a_reps):
        b = b_reps[i if len(b_reps) > 1 else 0]
        for other in (a, b):
            _check_pairable(first, other)
        if sorted(a["seeds"]) != sorted(b["seeds"]):
            raise UserError(
                f"compare: {a['path']} has seeds {a['seeds']} but {b['path']} has {b['seeds']}: "
                f"a paired comparison needs the same fine-tuning seeds"
            )
        order = [b["seeds"].index(s) for s in a["seeds"]]
        rows_a.append(a["preds"])
        rows_b.append(b["preds"][order])
        levels["pretraining"] += [i] * len(a["seeds"])
        levels["fine-tuning"] += a["seeds"]
    nested = len(a_reps) > 1
    res = hierarchical_paired_difference(
        first["targets"],
        np.concatenate(rows_a),
        np.concatenate(rows_b),
        first["metric"],
        None,
        n_boot,
        seed,
        levels=levels if nested else None,
    )
    names = (_name(a_paths), _name(b_paths))
    a_values = [v for a in a_reps for v in a["values"]]
    b_values = [v for b in b_reps for v in b["values"]]
    res.update(
        a=a_path if not nested else a_paths,
        b=b_path if len(b_paths) == 1 and not nested else b_paths,
        seed_pairs=levels["fine-tuning"],
        target=first["target"],
        a_summary=seed_summary(a_values),
        b_summary=seed_summary(b_values if len(b_reps) > 1 else np.asarray(b_values)[order]),
        interval="hierarchical bootstrap: seeds and test images resampled together, paired; "
        "estimate +- t(df) x bootstrap se",
    )
    if nested:
        res["pretraining_seed_pairs"] = [[p, b_paths[i if len(b_paths) > 1 else 0]] for i, p in enumerate(a_paths)]
        res["interval"] = (
            "hierarchical bootstrap: pretraining seeds (reports), fine-tuning seeds and test images resampled, "
            "paired; estimate +- t(df) x bootstrap se"
        )
    lo, hi = res["ci95"]
    li, hi_i = res["ci95_images_only"]
    if nested:
        seeds_note = (
            f"over {len(a_reps)} pretraining x {len(first['seeds'])} fine-tuning seeds x {res['n_test']} test images"
        )
    elif res["seeds"] > 1:
        seeds_note = f"over {res['seeds']} paired seeds x {res['n_test']} test images"
    else:
        seeds_note = f"one seed: test images only, seed noise NOT included; {res['n_test']} test images"
    print(
        f"compare: {_label(res['metric'])} {names[0]} - {names[1]} = {res['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
        f"(95%, {seeds_note}); per seed {' '.join(f'{v:+.3f}' for v in res['per_seed'])}; "
        f"test-images-only interval [{li:+.3f}, {hi_i:+.3f}]; {names[0]} {_mean_sd(res['a_summary'])}, "
        f"{names[1]} {_mean_sd(res['b_summary'])}",
        flush=True,
    )
    if out_json:
        atomic_write_json(out_json, res)
    return res


def _paths(spec) -> list[str]:
    """A report path, a comma-separated list of them, or a list."""
    paths = [p for p in (spec.split(",") if isinstance(spec, str) else list(spec)) if str(p)]
    if not paths:
        raise UserError("compare: no report given")
    return [str(p) for p in paths]


def _name(paths: list[str]) -> str:
    return Path(paths[0]).stem if len(paths) == 1 else "+".join(Path(p).stem for p in paths)


def _check_pairable(a: dict, b: dict) -> None:
    """The same task and the same test images, or a UserError naming both files."""
    if (a["target"], a["metric"]) != (b["target"], b["metric"]):
        raise UserError(
            f"compare: {a['path']} is {a['target']} ({a['metric']}) but {b['path']} is "
            f"{b['target']} ({b['metric']}): compare runs of one task"
        )
    same_test = (
        a["test_manifest_sha256"] == b["test_manifest_sha256"]
        and len(a["targets"]) == len(b["targets"])
        and np.array_equal(a["targets"], b["targets"])
    )
    if not same_test:
        raise UserError(
            f"compare: {a['path']} and {b['path']} were tested on different test sets ({len(a['targets'])} vs "
            f"{len(b['targets'])} images, manifest {str(a['test_manifest_sha256'])[:12]} vs "
            f"{str(b['test_manifest_sha256'])[:12]}): a paired comparison needs the same test images"
        )
