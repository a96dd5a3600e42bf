"""Pretraining throughput, in one run:

1. the loader's decoded pairs/s in one process (= per worker) vs webdataset's default
   ``.decode()`` pipeline over the same shards, same shuffle buffer and batch (target >= 3x);
2. training images/s with the real shard loader vs the same model on in-memory tensors
   (target ratio >= 0.95: the loader is never the bottleneck);
3. fp32 vs bf16 autocast training images/s on this machine;
4. with a GPU: ResNet101 images/s at bf16 + channels_last vs fp32.

    .venv/bin/python -m bench.train                      # simulates 512 pairs at 110x110 once (cached)
    .venv/bin/python -m bench.train --data shards/hst --arch resnet50 --batch 64 --workers 4

"images/s" counts training samples (pairs): each is two forward/backward passes through the network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hpc_lensiam.data.loader import ShardLoader
from hpc_lensiam.models.methods.simsiam import SimSiam, simsiam_loss
from hpc_lensiam.shards.manifest import shard_paths
from hpc_lensiam.train.config import TrainConfig
from hpc_lensiam.train.engine import Engine

from .common import REPO, parse_quick, print_ratio


def ensure_data(args) -> str:
    if args.data:
        return args.data
    out = REPO / "shards" / f"bench_train_{args.pairs}_{args.num_pix}"
    if not (out / "manifest.json").is_file():
        from hpc_lensiam.simulate.writer import simulate_shards

        print(f"bench: simulating {args.pairs} pairs at {args.num_pix}x{args.num_pix} into {out} (once)", flush=True)
        simulate_shards(
            out_dir=str(out),
            num_samples=args.pairs,
            shard_size=max(1, args.pairs // 8),
            mode="lensiam",
            seed=0,
            overrides={"instrument": {"num_pix": args.num_pix}},
            progress=False,
        )
    return str(out)


# -------------------------------------------------------------------------------------- decoding
def pairs_per_s(batches, batch: int) -> float:
    t, n = time.perf_counter(), 0
    for _ in batches:
        n += batch
    return n / (time.perf_counter() - t)


def bench_decode(data: str, batch: int, buffer: int, repeats: int) -> dict:
    import webdataset as wds

    urls = shard_paths(data)
    ours_loader = ShardLoader(data, "lensiam", batch, workers=0, shuffle_buffer=buffer)

    def default_wds():
        return (
            wds.WebDataset(urls, shardshuffle=False, empty_check=False)
            .shuffle(buffer)
            .decode()
            .to_tuple("view1.npy", "view2.npy")
            .batched(batch)
        )

    pairs_per_s(ours_loader.epoch(0), batch)  # warm the page cache
    ours = max(pairs_per_s(ours_loader.epoch(e), batch) for e in range(1, repeats + 1))
    theirs = max(pairs_per_s(default_wds(), batch) for _ in range(repeats))
    return {"loader_pairs_per_s_per_worker": ours, "wds_decode_pairs_per_s": theirs, "decode_speedup": ours / theirs}


# -------------------------------------------------------------------------------------- training
def make_engine(arch: str, precision: str, batch: int, channels_last: bool = True):
    cfg = TrainConfig(arch=arch, precision=precision, batch_size=batch, channels_last=channels_last)
    engine = Engine(cfg)
    torch.manual_seed(0)
    model = SimSiam(arch)
    engine.wrap(model, [{"params": list(model.parameters()), "lr": 0.01}])
    return engine


def step_seconds(engine, batches) -> float:
    """Wall time of one training step, the batch fetch included (CUDA synchronised)."""
    fmt = torch.channels_last if engine.cuda and engine.cfg.channels_last else torch.contiguous_format
    t = time.perf_counter()
    b = next(batches)
    x1 = b["x1"].to(engine.device, non_blocking=True, memory_format=fmt)
    x2 = b["x2"].to(engine.device, non_blocking=True, memory_format=fmt)
    p1, p2, z1, z2 = engine.forward(x1, x2)
    engine.backward(simsiam_loss(p1, p2, z1, z2))
    engine.step()
    if engine.cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(runs: dict, steps: int, warmup: int, batch: int) -> dict:
    """images/s of each ``name: (engine, batch iterator)`` from its fastest step, and ``paired``:
    the median over steps of (second's step time / first's), i.e. first over second in images/s.

    One step of each in turn, in alternating order, so a shared machine's load spikes and the
    loader workers' refill (which runs during whatever step comes next) hit both alike; other
    people's load only ever adds time, so the fastest step is the cleanest figure.
    """
    names = list(runs)
    times = {name: [] for name in names}
    for i in range(warmup + steps):
        for name in names if i % 2 == 0 else names[::-1]:
            engine, batches = runs[name]
            dt = step_seconds(engine, batches)
            if i >= warmup:
                times[name].append(dt)
    out = {name: batch / min(ts) for name, ts in times.items()}
    out["paired"] = statistics.median(b / a for a, b in zip(times[names[0]], times[names[1]]))
    return out


def loader_batches(loader: ShardLoader):
    epoch = 0
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def memory_batches(first: dict):
    while True:
        yield first


def synthetic(batch: int, hw, pinned: bool):
    x = {k: torch.rand(batch, 1, *hw) for k in ("x1", "x2")}
    return {k: (v.pin_memory() if pinned else v) for k, v in x.items()}


def bench_loader_vs_memory(data: str, arch: str, batch: int, workers: int, steps: int, warmup: int) -> dict:
    engine = make_engine(arch, "fp32", batch)
    loader = ShardLoader(data, "lensiam", batch, workers=workers, pin_memory=engine.cuda)
    stream = loader_batches(loader)
    first = next(stream)
    first = {k: first[k] for k in ("x1", "x2")}
    r = interleaved({"loader": (engine, stream), "memory": (engine, memory_batches(first))}, steps, warmup, batch)
    stream.close()
    return {
        "train_images_per_s_loader": r["loader"],
        "train_images_per_s_memory": r["memory"],
        "loader_over_memory": r["loader"] / r["memory"],
        "loader_over_memory_paired_median": r["paired"],
    }


def bench_precision(
    arch: str, batch: int, hw, steps: int, warmup: int, channels_last: bool, names=("fp32", "bf16")
) -> dict:
    runs = {}
    for name in names:
        engine = make_engine(
            arch, "bf16" if name.startswith("bf16") else "fp32", batch, channels_last and name.startswith("bf16")
        )
        runs[name] = (engine, memory_batches(synthetic(batch, hw, engine.cuda)))
    out = interleaved(runs, steps, warmup, batch)
    out["speedup"] = out[names[1]] / out[names[0]]
    out["speedup_paired_median"] = 1 / out.pop("paired")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="lensiam shard dir (default: simulate --pairs at --num-pix once)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--num-pix", type=int, default=110)
    p.add_argument("--arch", default="resnet18", help="model for the loader and precision runs")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision-steps", type=int, default=6, help="timed steps for fp32 vs bf16")
    p.add_argument("--gpu-batch", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the figures here")
    quick = dict(pairs=64, num_pix=48, batch=8, workers=1, steps=3, warmup=1, precision_steps=2, gpu_batch=8)
    a = parse_quick(p, argv, quick)

    data = ensure_data(a)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    hw = tuple(ShardLoader(data, "lensiam", 1, workers=0).image_shape)
    print(f"bench: {dev}; data {data} ({hw[0]}x{hw[1]}); torch {torch.__version__}", flush=True)
    res = {"device": dev, "image_shape": list(hw), "arch": a.arch, "batch": a.batch, "workers": a.workers}

    res.update(bench_decode(data, batch=a.batch, buffer=1000, repeats=3))
    print(
        f"decode: loader {res['loader_pairs_per_s_per_worker']:.0f} pairs/s per worker vs webdataset "
        f".decode() {res['wds_decode_pairs_per_s']:.0f} pairs/s = {res['decode_speedup']:.1f}x (target >= 3x)",
        flush=True,
    )

    res.update(bench_loader_vs_memory(data, a.arch, a.batch, a.workers, a.steps, a.warmup))
    print(
        f"train {a.arch} fp32 batch {a.batch}: shard loader ({a.workers} workers) "
        f"{res['train_images_per_s_loader']:.1f} images/s vs in-memory {res['train_images_per_s_memory']:.1f} "
        f"images/s = {res['loader_over_memory']:.3f} (target >= 0.95; step-by-step median "
        f"{res['loader_over_memory_paired_median']:.3f})",
        flush=True,
    )

    prec = bench_precision(a.arch, a.batch, hw, a.precision_steps, 1, channels_last=False)
    res.update(fp32_images_per_s=prec["fp32"], bf16_images_per_s=prec["bf16"], bf16_over_fp32=prec["speedup"])
    print(
        f"precision {a.arch} batch {a.batch} on {dev}: fp32 {prec['fp32']:.1f} images/s, bf16 autocast "
        f"{prec['bf16']:.1f} images/s (bf16/fp32 = {prec['speedup']:.2f}; step-by-step median "
        f"{prec['speedup_paired_median']:.2f})",
        flush=True,
    )

    if torch.cuda.is_available():
        gpu = bench_precision(
            "resnet101", a.gpu_batch, hw, 20, 5, channels_last=True, names=("fp32", "bf16_channels_last")
        )
        res["gpu_resnet101"] = gpu
        print(
            f"GPU resnet101 batch {a.gpu_batch}: fp32 {gpu['fp32']:.0f} images/s, bf16+channels_last "
            f"{gpu['bf16_channels_last']:.0f} images/s ({gpu['speedup']:.2f}x; step-by-step median "
            f"{gpu['speedup_paired_median']:.2f}x)",
            flush=True,
        )
    else:
        print("GPU: none on this machine; ResNet101 bf16+channels_last vs fp32 not measured", flush=True)

    print(
        "figures: "
        + json.dumps(
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if not isinstance(v, dict)}
        ),
        flush=True,
    )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    print_ratio(res["decode_speedup"], "our shard decode over webdataset .decode(), pairs/s")
    return res


if __name__ == "__main__":
    main()
