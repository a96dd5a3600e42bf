"""Online rendering benchmark: the torch renderer vs the lenstronomy path, and training online vs shards.

In one run, side by side on this machine (the machine may be shared: rendering is measured in
interleaved rounds and the best round of each is kept):

1. rendered LenSiam pairs/s: ``LensSimulator.sample_pair`` on one core (the per-core rate an MPI
   ``simulate`` job scales) vs ``TorchLensSimulator.sample_pairs`` on ``--device`` (on a CPU, with
   all of torch's threads; its per-core rate is that / threads), for each ``--batch`` size;
2. the accuracy behind the figures: max |torch - lenstronomy| of the same systems, both dtypes;
3. training pairs/s of the real trainer (``train``) on shards vs ``--data online`` with the same
   model, batch and steps; the ratio online / shards is the figure of merit (the goal on a GPU is
   >= 0.9 with ResNet101: rendering must hide behind the step).

Usage (CPU, small):   python -m bench.online --batch 8 32 --train-steps 4
Usage (GPU, paper):   python -m bench.online --device cuda --batch 256 1024 4096 --arch resnet101 \\
                          --train-batch 128 --precision bf16 --train-steps 20
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from hpc_lensiam.simulate.config import simulation_config
from hpc_lensiam.simulate.torch_render import TorchLensSimulator

from .common import parse_quick, print_ratio

try:  # the lenstronomy reference: absent on the GPU machine's bare image, where only torch renders
    import lenstronomy  # noqa: F401

    from hpc_lensiam.simulate.simulator import LensSimulator
except ImportError:
    LensSimulator = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def numpy_pairs_per_s(sim, pairs: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(pairs):
        sim.sample_pair(rng)
    return pairs / (time.perf_counter() - t0)


def torch_pairs_per_s(sim: TorchLensSimulator, batch: int, repeats: int, seed: int) -> float:
    g = torch.Generator(device=sim.device)
    g.manual_seed(seed)
    _sync(sim.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        sim.sample_pairs(batch, g)
    _sync(sim.device)
    return batch * repeats / (time.perf_counter() - t0)


def bench_render(cfg, device: str, batches: list[int], numpy_pairs: int, rounds: int, compile: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = LensSimulator(cfg) if LensSimulator is not None and numpy_pairs else None
        sim = TorchLensSimulator(cfg, device=device, chunk_systems=max(batches), compile=compile)
    for b in batches:  # warm-up: allocator, FFT plans, series-term table
        sim.sample_pairs(b, torch.Generator(device=sim.device).manual_seed(0))
    if ref is not None:
        ref.sample_pair(np.random.default_rng(0))
    if compile:  # the compiled kernels must render what the eager ones do
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            eager = TorchLensSimulator(cfg, device=device, chunk_systems=max(batches))
        a, b = (s.sample_pairs(batches[0], torch.Generator(device=sim.device).manual_seed(3)) for s in (sim, eager))
        diff = max(float((a[k] - b[k]).abs().max()) for k in ("view1", "view2"))
        print(f"render: compiled vs eager: max |difference| {diff:.1e} of the peak", flush=True)
    best = {"lenstronomy_1core": 0.0 if ref is not None else math.nan, **{f"torch_b{b}": 0.0 for b in batches}}
    for r in range(rounds):
        if ref is not None:
            best["lenstronomy_1core"] = max(best["lenstronomy_1core"], numpy_pairs_per_s(ref, numpy_pairs, r))
        for b in batches:
            repeats = max(1, 64 // b) if sim.device.type == "cpu" else max(2, 8192 // b)
            best[f"torch_b{b}"] = max(best[f"torch_b{b}"], torch_pairs_per_s(sim, b, repeats, r))
    out = {
        "device": str(sim.device),
        "threads": torch.get_num_threads(),
        "num_pix": sim.num_pix,
        "supersampling": sim.supersampling,
        "series_terms": sim.prior_series_terms,
        "pairs_per_s": best,
    }
    for b in batches:
        print(
            f"render: torch {sim.device} batch {b}: {best[f'torch_b{b}']:.1f} pairs/s "
            f"({best[f'torch_b{b}'] / best['lenstronomy_1core']:.2f}x one lenstronomy core)",
            flush=True,
        )
    if ref is None:
        print("render: lenstronomy LensSimulator: not measured (lenstronomy not importable here)", flush=True)
    else:
        print(f"render: lenstronomy LensSimulator: {best['lenstronomy_1core']:.1f} pairs/s per core", flush=True)
    return out


def bench_accuracy(cfg, device: str, systems: int) -> dict:
    """Max |torch - lenstronomy| (images are max-normalised: a fraction of the peak) on sampled
    systems of ``cfg`` (a no-noise config: noise draws differ between the two generators)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = LensSimulator(cfg)
        out = {}
        for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            sim = TorchLensSimulator(cfg, device=device, dtype=dtype)
            drawn = sim.sample_pairs(systems, torch.Generator(device=sim.device).manual_seed(1))
            worst = 0.0
            for b, rec in enumerate(sim.records(drawn["params"])):
                for v, key in enumerate(("view1", "view2")):
                    view = rec["views"][v]
                    want = ref.render(rec["lens"], view["source"], lens_light=view["lens_light"], psf=view["psf_id"])
                    worst = max(worst, float(np.abs(drawn[key][b].double().cpu().numpy() - want).max()))
            out[name] = worst
            print(
                f"accuracy: {name}: max |torch - lenstronomy| = {worst:.2e} of the peak over "
                f"{2 * systems} views ({sim.prior_series_terms} EPL terms)",
                flush=True,
            )
    return out


def bench_training(args, cfg_yaml: Path, tmp: Path) -> dict:
    """The real trainer on shards vs online, same model/batch/steps; mean images/s after warm-up."""
    from hpc_lensiam.simulate.writer import simulate_shards
    from hpc_lensiam.train.loop import train, train_config

    data = tmp / "shards"
    pairs = args.train_batch * (args.train_steps + 1)
    simulate_shards(
        out_dir=data,
        num_samples=pairs,
        shard_size=max(1, pairs // 4),
        mode="lensiam",
        seed=0,
        config_path=str(cfg_yaml),
        engine="torch",
        device=args.device,
        progress=False,
    )
    common = dict(
        arch=args.arch,
        batch_size=args.train_batch,
        max_steps=args.train_steps,
        epochs=1,
        workers=args.workers,
        precision=args.precision,
        log_every=1,
        proj_dim=2048,
        pred_dim=512,
        ckpt_every=10**6,
        online_epoch_samples=pairs,
        online_compile=args.compile,
    )
    rates = {}
    for name, spec in (("shards", str(data)), ("online", f"online:{cfg_yaml}")):
        run = tmp / f"run_{name}"
        train(train_config(data=spec, out=str(run), **common))
        steady = steady_rows(run / "metrics.csv", args.skip_rows, args.train_batch)
        rates[name] = steady["pairs_per_s"]
        rates[f"{name}_data_wait_fraction"] = steady["data_wait_fraction"]
        print(
            f"train: {args.arch} batch {args.train_batch} {args.precision} on {name}: {rates[name]:.1f} pairs/s "
            f"({2 * rates[name]:.1f} images/s; steady rows only, no start-up or checkpoint save), data wait "
            f"{steady['data_wait_fraction']:.1%} of the step",
            flush=True,
        )
    rates["ratio_online_over_shards"] = rates["online"] / rates["shards"] if rates["shards"] else math.nan
    return rates


def steady_rows(metrics_csv: Path, skip: int, pairs_per_step: int) -> dict:
    """Steady-state throughput of a run's metrics.csv written with ``--log-every 1`` (a row per
    step): the rows after the first ``skip`` (start-up: the warm-up step, cudnn autotuning), pairs/s
    as total pairs / total time (no row holds a checkpoint save: train/monitor.py), and the
    data-wait share of the step time."""
    import csv

    with open(metrics_csv, newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    rows = rows[skip:] if len(rows) > skip else rows[-1:]
    seconds = sum(pairs_per_step / r["pairs_per_s"] for r in rows)
    wait, compute = sum(r["data_wait_s"] for r in rows), sum(r["compute_s"] for r in rows)
    return {
        "rows": len(rows),
        "pairs_per_s": pairs_per_step * len(rows) / seconds,
        "data_wait_fraction": wait / (wait + compute),
        "data_wait_s": wait / len(rows),
        "compute_s": compute / len(rows),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda: where the torch renderer and the trainer run")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 32], help="render batch sizes")
    p.add_argument("--num-pix", type=int, default=110)
    p.add_argument("--cosmos-dir", default=None)
    p.add_argument("--numpy-pairs", type=int, default=8, help="lenstronomy pairs per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--accuracy-systems", type=int, default=4, help="0 skips the accuracy check")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=3, help="0 skips the training comparison")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--skip-rows", type=int, default=1, help="metrics rows of start-up left out of the rates")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the ray shooting (render and online)")
    p.add_argument("--json", default=None, help="also write the figures here")
    quick = dict(batch=[8], num_pix=48, numpy_pairs=2, rounds=1, accuracy_systems=2, train_batch=4, train_steps=2)
    args = parse_quick(p, argv, quick)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device on this machine (the CUDA path is written but unmeasured here)")

    inst = {"num_pix": args.num_pix}
    cfg = simulation_config(cosmos_dir=args.cosmos_dir, instrument=inst)
    t0 = time.perf_counter()
    result = {"render": bench_render(cfg, args.device, args.batch, args.numpy_pairs, args.rounds, args.compile)}
    result["render"]["compile"] = args.compile
    print(f"render: measured in {time.perf_counter() - t0:.0f} s (compile {args.compile})", flush=True)
    if args.accuracy_systems and LensSimulator is None:
        print("accuracy: skipped (lenstronomy not importable here; tests/test_torch_render.py checks it)", flush=True)
    elif args.accuracy_systems:
        quiet = simulation_config(cosmos_dir=args.cosmos_dir, instrument={**inst, "noise_sigma": [0.0, 0.0]})
        result["accuracy_max_abs_of_peak"] = bench_accuracy(quiet, args.device, args.accuracy_systems)
    if args.train_steps:
        with tempfile.TemporaryDirectory() as d:
            cfg_yaml = Path(d) / "sim.yaml"
            cfg_yaml.write_text(
                f"instrument:\n  num_pix: {args.num_pix}\n"
                + (f"cosmos_dir: {args.cosmos_dir}\n" if args.cosmos_dir else "")
            )
            result["train_pairs_per_s"] = bench_training(args, cfg_yaml, Path(d))
    best_torch = max(v for k, v in result["render"]["pairs_per_s"].items() if k.startswith("torch"))
    line = (
        f"online bench: {args.device}: torch renderer {best_torch:.1f} pairs/s vs lenstronomy "
        f"{result['render']['pairs_per_s']['lenstronomy_1core']:.1f} pairs/s per core"
    )
    if "train_pairs_per_s" in result:
        t = result["train_pairs_per_s"]
        line += (
            f"; training pairs/s online/shards = {t['online']:.1f}/{t['shards']:.1f} = "
            f"{t['ratio_online_over_shards']:.2f}"
        )
    print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if "train_pairs_per_s" in result:
        print_ratio(result["train_pairs_per_s"]["ratio_online_over_shards"], "training online over shards, pairs/s")
    return result


if __name__ == "__main__":
    main()
