"""The paper's experiment end to end, at the scale this machine allows; writes docs/science/<tag>.md.

LenSiam vs baseline SimSiam vs no pretraining, with the same arch, data size, epochs and seed:
simulate -> pretrain both -> embed a held-out LenSiam set with both -> probe (--against) and UMAP
-> export both -> fine-tune theta_E on an independent euclid set from each backbone and from random
init (same train/test split). Every step is the package's own CLI, so the commands in results.md
are what a user runs. Each step is resumable: rerun the same command after an interruption.

    .venv/bin/python bench/science.py                    # ~2 h on 2 CPU cores (the defaults)
    .venv/bin/python bench/science.py --pairs 512 --epochs 2 --out runs/science-smoke   # smoke test

Each run writes ``docs/science/<tag>.md`` (tables, commands, wall times) and its UMAP figures next
to it; ``docs/results.md`` is the hand-written reading of those runs. With ``--curve`` every
periodic checkpoint (``--ckpt-every`` steps) is embedded and probed too: lens physics vs steps.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NPROC = 2


BACKBONES = ("LenSiam", "SimSiam", "no pretraining")


def finetune_json(out: Path, name: str) -> Path:
    """Where the fine-tuning report of backbone ``name`` (one of BACKBONES) lives."""
    return out / f"finetune_{name.split()[0].lower()}.json"


def run(cmd: list, log: list, name: str) -> float:
    """Run one CLI step, echo it, record its wall time."""
    cmd = [str(c) for c in cmd]
    print(f"\n[science] {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    dt = time.perf_counter() - t0
    shown = shlex.join(cmd).replace(str(BIN) + "/", ".venv/bin/").replace(str(REPO) + "/", "")
    log.append({"step": name, "command": shown, "seconds": dt})
    print(f"[science] {name}: {dt:.0f} s", flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/science", help="working folder (shards, runs, embeddings)")
    ap.add_argument("--tag", default="default", help="names docs/science/<tag>.md and its figures")
    ap.add_argument("--pairs", type=int, default=4096, help="LenSiam pretraining pairs")
    ap.add_argument("--probe-pairs", type=int, default=1024, help="held-out pairs for embeddings/probe")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--num-pix", type=int, default=110, help="image side (0.05\"/px hst; 0.1\"/px euclid)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64, help="per process; 2 processes")
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction, default=True,
                    help="pretraining init (SimSiam reference: on); see docs/results.md")
    ap.add_argument("--ckpt-every", type=int, default=0, help="periodic checkpoints every N steps (0: none)")
    ap.add_argument("--curve", action="store_true", help="embed + probe every periodic checkpoint")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/science.json")
    a = ap.parse_args()
    docs = REPO / "docs" / "science"
    docs.mkdir(parents=True, exist_ok=True)

    out = REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        saved = json.loads((out / "science.json").read_text())
        for name in BACKBONES:
            saved["results"]["finetune"][name] = json.loads(finetune_json(out, name).read_text())
        write_results(docs / f"{a.tag}.md", a, saved["steps"], saved["results"], saved["seconds"])
        return
    sim_yaml = out / "sim.yaml"
    sim_yaml.write_text(f"instrument:\n  num_pix: {a.num_pix}\n")
    hl, mpiexec, torchrun = BIN / "hpc-lensiam", BIN / "mpiexec", BIN / "torchrun"
    log: list[dict] = []
    t_start = time.perf_counter()

    shards = {"lensiam": out / "shards/lensiam", "probe": out / "shards/probe",
              "euclid_train": out / "shards/euclid_train", "euclid_test": out / "shards/euclid_test"}
    sim = [mpiexec, "-n", NPROC, hl, "simulate", "--config", sim_yaml, "--shard-size", 128]
    run(sim + ["--out", shards["lensiam"], "--pairs", a.pairs, "--seed", a.seed], log, "simulate LenSiam pairs")
    run(sim + ["--out", shards["probe"], "--pairs", a.probe_pairs, "--seed", a.seed + 1000], log,
        "simulate held-out probe pairs")
    for name, n, seed in (("euclid_train", int(a.n_train * 1.25), 2000), ("euclid_test", a.n_test, 3000)):
        run(sim + ["--out", shards[name], "--pairs", n, "--seed", a.seed + seed, "--mode", "single",
                   "--preset", "euclid"], log, f"simulate {name}")

    results: dict = {"probe": None, "finetune": {}, "umap": {}, "curve": {}}
    zi = [] if a.zero_init_residual else ["--no-zero-init-residual"]
    ck = ["--ckpt-every", a.ckpt_every] if a.ckpt_every else []
    for mode in ("lensiam", "simsiam"):
        run_dir = out / f"run_{mode}"
        resume = ["--resume"] if (run_dir / "checkpoints" / "last.pt").exists() else []
        run([torchrun, "--standalone", "--nproc_per_node", NPROC, "-m", "hpc_lensiam", "train",
             "--data", shards["lensiam"], "--out", run_dir, "--mode", mode, "--arch", a.arch,
             "--epochs", a.epochs, "--batch-size", a.batch_size, "--seed", a.seed, "--precision", "fp32",
             "--warmup-epochs", max(1, a.epochs // 10), *zi, *ck, *resume], log, f"pretrain {mode}")
        ckpt = run_dir / "checkpoints" / "last.pt"
        emb = out / f"emb_{mode}.h5"
        run([torchrun, "--standalone", "--nproc_per_node", NPROC, "-m", "hpc_lensiam", "embed",
             "--checkpoint", ckpt, "--data", shards["probe"], "--out", emb], log, f"embed {mode}")
        if a.curve:
            results["curve"][mode] = learning_curve(run_dir, shards["probe"], out, mode, torchrun, hl, log)
        png = docs / f"umap_{mode}_{a.tag}.png"
        run([hl, "umap", "--embeddings", emb, "--out", png, "--seed", a.seed], log, f"umap {mode}")
        results["umap"][mode] = str(png.relative_to(REPO))
        run([hl, "export", "--checkpoint", ckpt, "--out", out / f"backbone_{mode}.pt"], log, f"export {mode}")

    probe_json = out / "probe.json"
    run([hl, "probe", "--embeddings", out / "emb_lensiam.h5", "--against", out / "emb_simsiam.h5",
         "--json", probe_json], log, "probe LenSiam vs SimSiam")
    results["probe"] = json.loads(probe_json.read_text())

    for name, backbone in (("LenSiam", out / "backbone_lensiam.pt"), ("SimSiam", out / "backbone_simsiam.pt"),
                           ("no pretraining", "none")):
        fj = finetune_json(out, name)
        run([hl, "finetune", "--backbone", backbone, "--arch", a.arch, "--train", shards["euclid_train"],
             "--test", shards["euclid_test"], "--target", "theta_E", "--n-train", a.n_train,
             "--n-test", a.n_test, "--epochs", a.finetune_epochs, "--seed", a.seed, "--json", fj],
            log, f"finetune {name}")
        results["finetune"][name] = json.loads(fj.read_text())

    total = time.perf_counter() - t_start
    (out / "science.json").write_text(json.dumps({"args": vars(a), "steps": log, "results": results,
                                                   "seconds": total}, indent=1, default=str))
    md = docs / f"{a.tag}.md"
    write_results(md, a, log, results, total)
    print(f"\n[science] done in {total / 60:.1f} min; results in {md.relative_to(REPO)}", flush=True)


def learning_curve(run_dir: Path, probe_shards: Path, out: Path, mode: str, torchrun, hl, log) -> dict:
    """Probe ridge R^2 at every periodic checkpoint: {step: {param: R^2}}."""
    curve = {}
    for ck in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        step = int(ck.stem.split("_")[1])
        emb, pj = out / f"curve_{mode}_{step}.h5", out / f"curve_{mode}_{step}.json"
        run([torchrun, "--standalone", "--nproc_per_node", NPROC, "-m", "hpc_lensiam", "embed",
             "--checkpoint", ck, "--data", probe_shards, "--out", emb], log, f"embed {mode} step {step}")
        run([hl, "probe", "--embeddings", emb, "--json", pj], log, f"probe {mode} step {step}")
        curve[step] = next(iter(json.loads(pj.read_text())["results"].values()))["ridge"]
    return curve


def write_results(path: Path, a, log: list, results: dict, total: float) -> None:
    probe = results["probe"]["results"]
    labels = list(probe)
    lines = ["# LenSiam vs SimSiam vs no pretraining, measured on this machine", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; "
             f"Python {platform.python_version()}. Total wall time {total / 60:.1f} min.", "",
             f"Set-up: {a.pairs} LenSiam pairs ({a.num_pix}x{a.num_pix} px, hst preset, analytic sources, "
             f"built-in PSFs), {a.arch}, {a.epochs} epochs, batch {a.batch_size} x {NPROC} processes, "
             f"seed {a.seed}; the baseline SimSiam trains on view1 of the same pairs with the standard "
             f"augmentations. Probe on {a.probe_pairs} held-out pairs; fine-tuning on an independent euclid set, "
             f"{a.n_train} train (plus a validation split) / {a.n_test} test images, {a.finetune_epochs} epochs. "
             f"Pretraining init: zero_init_residual={'on' if a.zero_init_residual else 'off'}.", "",
             "## Probe: held-out R^2 of the 8 lens parameters from the frozen features", "",
             "| parameter | " + " | ".join(f"{lab} k-NN | {lab} ridge" for lab in labels) + " |",
             "|---|" + "---|" * (2 * len(labels))]
    names = list(next(iter(probe.values()))["knn"])
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{probe[lab]['knn'][name]:.3f} | {probe[lab]['ridge'][name]:.3f}"
                                                 for lab in labels) + " |")
    lines.append("| mean of 8 | " + " | ".join(
        f"{sum(probe[lab]['knn'].values()) / len(names):.3f} | {sum(probe[lab]['ridge'].values()) / len(names):.3f}"
        for lab in labels) + " |")
    lines += ["", "## Downstream: theta_E regression on the independent euclid set", "",
              "| backbone | test R^2 | 95% bootstrap interval | residual sigma (arcsec) | paper R^2 |",
              "|---|---|---|---|---|"]
    paper = {"LenSiam": "0.586", "SimSiam": "0.426", "no pretraining": "0.360 (ImageNet-supervised)"}
    for name, r in results["finetune"].items():
        lines.append(f"| {name} | {r['r2']:.3f} | [{r['r2_ci95'][0]:.3f}, {r['r2_ci95'][1]:.3f}] | "
                     f"{r['residual_sigma']:.4f} | {paper[name]} |")
    if results.get("curve"):
        lines += ["", "## Probe ridge R^2 vs pretraining step (periodic checkpoints, same held-out set)", "",
                  "| method | step | theta_E | e1 | gamma | mean of 8 |", "|---|---|---|---|---|---|"]
        for mode, curve in results["curve"].items():
            for step, r in curve.items():
                lines.append(f"| {mode} | {step} | {r['theta_E']:.3f} | {r['e1']:.3f} | {r['gamma']:.3f} | "
                             f"{sum(r.values()) / len(r):.3f} |")
    pairs = [("LenSiam", "SimSiam"), ("LenSiam", "no pretraining"), ("SimSiam", "no pretraining")]
    ft = results["finetune"]
    if all("test_predictions" in ft.get(n, {}) for n in BACKBONES):
        from hpc_lensiam.finetune import paired_r2_difference
        lines += ["", "Paired comparison on the same test images (paired bootstrap, 1000 resamples):", "",
                  "| difference | delta R^2 | 95% interval |", "|---|---|---|"]
        y = ft["LenSiam"]["test_targets"]
        for x, z in pairs:
            d, lo, hi = paired_r2_difference(y, ft[x]["test_predictions"], ft[z]["test_predictions"])
            lines.append(f"| {x} - {z} | {d:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    lines += ["", "## UMAP of the held-out embeddings", ""]
    for mode, png in results["umap"].items():
        lines.append(f"![{mode}]({Path(png).name})")
    lines += ["", "## Commands and wall times", "", "| step | seconds | command |", "|---|---|---|"]
    for s in log:
        lines.append(f"| {s['step']} | {s['seconds']:.0f} | `{s['command']}` |")
    argv = " ".join(x for x in sys.argv[1:] if x != "--report-only")
    lines += ["", f"Made by `.venv/bin/python bench/science.py {argv}`.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


if __name__ == "__main__":
    main()
