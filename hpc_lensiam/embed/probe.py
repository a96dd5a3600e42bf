"""``hpc-lensiam probe``: how much lens physics an embeddings file holds, per parameter and file.

The probes themselves (split, ridge, k-NN, classifiers) are :mod:`hpc_lensiam.evaluation.probe`,
shared with the training monitor.

The split is by lens system (``pair_id``/key), a pure function of the sample key, so a LenSiam and a
baseline file made from the same shards are probed on identical splits (details in the core's doc).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_write_json, check_output_file
from ..evaluation.probe import MODELS, probe_arrays, probe_classify, split_by_key
from ..shards.manifest import LENS_PARAMS
from .config import ProbeConfig
from .extract import load_embeddings


def _label(emb: dict, taken: set) -> str:
    a = emb["attrs"]
    label = str(a.get("train_mode") or Path(emb["path"]).stem)
    if label in taken:
        label = Path(emb["path"]).stem
    if label in taken:
        label = emb["path"]
    return label


def probe_file(path: str, test_fraction: float = 0.2, k: int = 10, seed_salt: str = "probe-split/1") -> dict:
    emb = load_embeddings(path, need_params=False)
    # parameters absent from the file (ingested real images without labels) are skipped; the probe
    # runs on the images that know every remaining one
    names = [p for p in LENS_PARAMS if p in emb["params"]]
    if not names:
        raise UserError(
            f"{path}: no lens parameters (no params/<name> datasets); expected an embeddings "
            "file written by `hpc-lensiam embed` from simulated or labelled shards"
        )
    known = np.ones(len(emb["keys"]), bool)
    for p in names:
        known &= emb["params_known"].get(p, True)
    skipped = [p for p in LENS_PARAMS if p not in names]
    if skipped or not known.all():
        print(
            f"probe: {path}: {int(known.sum())} of {len(known)} images have lens parameters"
            + (f"; skipping absent {', '.join(skipped)}" if skipped else ""),
            flush=True,
        )
    emb = {
        **emb,
        "features": emb["features"][known],
        "keys": emb["keys"][known],
        "pair_id": emb["pair_id"][known],
        "params": {p: emb["params"][p][known] for p in names},
    }
    test = split_by_key(emb["keys"], test_fraction, seed_salt)
    res = probe_arrays(emb["features"], emb["params"], emb["pair_id"], test, k=k)
    if emb.get("is_lens") is not None:
        res["classify"] = probe_classify(emb["features"], emb["is_lens"], emb["pair_id"], test, k=k)
    res["skipped"] = skipped
    a = emb["attrs"]
    res["file"] = str(path)
    res["n_train"], res["n_test"] = int((~test).sum()), int(test.sum())
    res["systems_train"] = int(len(np.unique(emb["pair_id"][~test])))
    res["systems_test"] = int(len(np.unique(emb["pair_id"][test])))
    res["test_keys"] = [str(k) for k in np.asarray(emb["keys"])[test]]
    res["test_pair_id"] = np.asarray(emb["pair_id"])[test].tolist()
    res["feature_dim"] = int(emb["features"].shape[1])
    for key in ("arch", "train_mode", "step", "checkpoint", "manifest_sha256"):
        if key in a:
            v = a[key]
            res[key] = v.item() if hasattr(v, "item") else v
    return res


def _cell(res: dict, model: str, name: str) -> str:
    ci = res.get(f"{model}_ci95", {}).get(name)
    return f"{res[model][name]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def format_table(results: dict[str, dict]) -> str:
    labels = list(results)
    head = ["parameter"] + [f"{lab} {m}" for lab in labels for m in ("k-NN", "ridge")]
    names = [p for p in LENS_PARAMS if all(p in results[lab]["knn"] for lab in labels)]
    rows = [[name] + [_cell(results[lab], m, name) for lab in labels for m in MODELS] for name in names]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "-" * len(line(head))
    notes = [
        f"{lab}: {r['file']} ({r.get('arch', '?')}, step {r.get('step', '?')}), "
        f"{r['n_train']} train / {r['n_test']} test images, "
        f"{r['systems_train']} / {r['systems_test']} lens systems"
        for lab, r in results.items()
    ]
    title = "held-out R^2 [95% bootstrap interval over test lens systems] (split by lens system)"
    for lab, r in results.items():
        for m, c in r.get("classify", {}).items():
            ci = c["auc_ci95"]
            notes.append(
                f"{lab} {m} lens finding: AUC {c['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], "
                + ", ".join(
                    f"TPR@FPR={f} {v['tpr']:.2f}" + ("" if v["resolvable"] else " (unresolved)")
                    for f, v in c["tpr_at_fpr"].items()
                )
                + f" ({c['n_lenses']} lenses / {c['n_non_lenses']} non-lenses in test)"
            )
    return "\n".join([title, sep, line(head), sep, *map(line, rows), sep, *notes])


def probe(
    embeddings: str | None = None,
    against: str | None = None,
    out_json: str | None = None,
    test_fraction: float | None = None,
    k: int | None = None,
    config: ProbeConfig | None = None,
) -> dict:
    """Probe one embeddings file (and optionally a second one side by side); print a table."""
    if config is None:  # the Python API's arguments (None: the config's default), validated once
        config = from_flags(
            ProbeConfig,
            dict(embeddings=embeddings, against=against, json=out_json, test_fraction=test_fraction, k=k),
        )
    c = config
    embeddings, against, out_json, test_fraction, k = c.embeddings, c.against, c.json, c.test_fraction, c.k
    if out_json:
        check_output_file(out_json, "--json")
    results: dict[str, dict] = {}
    for path in [embeddings] + ([against] if against else []):
        res = probe_file(path, test_fraction, k)
        results[_label(load_embeddings_attrs_only(path), set(results))] = res
    print(format_table(results), flush=True)
    paired = paired_differences(*results.values()) if against else None
    if paired:
        a, b = list(results)
        for m in MODELS:
            print(
                f"paired {m} R^2 difference {a} - {b} on the same {paired['systems']} test systems [95% over "
                f"systems]: "
                + ", ".join(
                    f"{p} {d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" for p, d in paired[m].items()
                ),
                flush=True,
            )
    report = {
        "split": {
            "by": "lens system (sample key)",
            "test_fraction": test_fraction,
            "rule": "sha256('probe-split/1' + key) < test_fraction",
        },
        "knn": {"k": k, "features": "standardised (train stats), l2-normalised"},
        "ridge": {"alpha_cv": "5-fold GroupKFold inside the train split", "features": "standardised"},
        "ci95": {
            "resamples": "test lens systems (both views of a pair together), probe held fixed",
            "method": "percentile bootstrap",
            "n_boot": 1000,
            "seed": 0,
        },
        "results": results,
        "paired_difference": paired,
    }
    if out_json:
        atomic_write_json(out_json, report)
        print(f"probe: table written to {out_json}", flush=True)
    return report


def paired_differences(a: dict, b: dict, n_boot: int = 1000) -> dict | None:
    """R^2(a) - R^2(b) per model and parameter on the same test systems, interval over systems.

    Both files must hold the same test samples (same keys: embeddings of the same shards); the
    shared difficulty of each system then cancels, which two separate intervals cannot show.
    None when the test samples differ.
    """
    from ..evaluation.stats import hierarchical_paired_difference

    if a.get("test_keys") != b.get("test_keys") or "test_predictions" not in a:
        return None
    out: dict = {"systems": a["systems_test"]}
    for m in MODELS:
        out[m] = {}
        for name, y in a["test_targets"].items():
            r = hierarchical_paired_difference(
                y, [a["test_predictions"][m][name]], [b["test_predictions"][m][name]], "r2", a["test_pair_id"], n_boot
            )
            out[m][name] = {"delta": r["delta"], "ci95": r["ci95"]}
    return out


def load_embeddings_attrs_only(path: str) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {"path": str(path), "attrs": dict(f.attrs)}
