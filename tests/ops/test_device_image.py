"""The GPU machine's check runs on its bare image: proven here, on a CPU, before that machine is lent.

The GPU machine has Python 3.12 with only the packages of bench/device_image.txt (torch 2.11, ...;
no lenstronomy, webdataset, DeepSpeed, astropy, umap-learn, faiss), no package index, and this
repository plus the ignored files named to travel with it (``.whl/``, ``make gpu-wheels``). Here:
a Python 3.12 venv of exactly that list (ci/device-image-env.sh, built once into the ignored
``.device-image/``; torch is PyPI's CUDA build, which runs on a CPU), the network cut
(``unshare -n``: a new network namespace holding only its loopback interface; else a
sitecustomize that refuses every non-loopback connect), and ``bench/gpu_check.py --cpu-smoke``
run to the end in it; its results file must hold every case's rows. Run by
``make device-image-check`` (CI's second step), not by ``make test``: building the venv
downloads ~5 GB once, and the smoke takes minutes.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO

pytestmark = [pytest.mark.device_image, pytest.mark.timeout(5400)]  # venv build + a 15-min smoke
ENV = REPO / ".device-image"
ABSENT = ("lenstronomy", "webdataset", "deepspeed", "astropy", "umap", "faiss", "pytest")
BLOCKER = """import socket
_connect = socket.socket.connect
def _loopback_only(self, address):
    host = str(address[0])
    if self.family in (socket.AF_INET, socket.AF_INET6) and not host.startswith(("127.", "::1", "localhost")):
        raise OSError(101, "network is off (tests/ops/test_device_image.py)")
    return _connect(self, address)
socket.socket.connect = _loopback_only
"""


def _offline(tmp_path: Path) -> tuple[list[str], dict]:
    """The command prefix and environment that cut the network for what runs under them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1")
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    # a new network namespace has only a loopback interface, down: up it (gloo and torchrun's
    # rendezvous bind 127.0.0.1), then run the command; nothing else is reachable
    prefix = [unshare, "-n", "sh", "-c", f'{ip} link set lo up && exec "$@"', "offline"] if unshare and ip else []
    if prefix and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix, env
    site = tmp_path / "offline_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return [], {**env, "PYTHONPATH": str(site)}


@pytest.fixture(scope="module")
def device_image() -> Path:
    p = subprocess.run(["bash", str(REPO / "ci" / "device-image-env.sh"), str(ENV)], capture_output=True, text=True)
    if p.returncode == 3:
        pytest.skip(f"no Python 3.12 on this machine: {p.stderr.strip()}")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return ENV / "bin" / "python"


def test_gpu_check_cpu_smoke_on_the_device_image_offline(device_image, tmp_path):
    prefix, env = _offline(tmp_path)
    # the venv is the image: Python 3.12, torch 2.11, and none of the packages it lacks
    probe = (
        "import importlib.util, sys, torch; print(sys.version_info[:2], torch.__version__.split('+')[0], "
        f"[m for m in {ABSENT!r} if importlib.util.find_spec(m)])"
    )
    p = subprocess.run([*prefix, str(device_image), "-c", probe], env=env, capture_output=True, text=True, cwd="/")
    assert p.stdout.split() == ["(3,", "12)", "2.11.0", "[]"], p.stdout + p.stderr
    # the network is off: no name lookup, no connection
    net = "import socket; socket.create_connection(('pypi.org', 443), timeout=5)"
    p = subprocess.run([*prefix, str(device_image), "-c", net], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "error" in p.stderr.lower(), p.stderr

    out = tmp_path / "out"
    wheels = sorted(p.name for p in (REPO / ".whl").glob("*.whl"))
    cmd = [
        *prefix,
        str(device_image),
        "-m",
        "bench.gpu_check",
        "--cpu-smoke",
        "--out",
        str(tmp_path / "w"),
    ]
    cmd += ["--budget-s", "3000", "--case-timeout-s", "1200"]
    p = subprocess.run(cmd, env={**env, "OUT": str(out)}, capture_output=True, text=True, timeout=3600, cwd=REPO)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    with open(out / "gpu_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["case"], r["figure"]): r for r in rows}
    for case, figure in [
        ("simulate_shards", "pairs"),
        ("sweep_bf16_b4", "images_per_s"),
        ("sweep_bf16_b4", "images_per_s_compute"),
        ("sweep_bf16_b4", "data_wait_fraction"),
        ("fp32", "ratio_bf16_over_fp32"),
        ("online", "pairs_per_s_b8"),
        ("online", "ratio_online_over_shards"),
        ("online", "data_wait_fraction"),
        ("allreduce_gloo_2proc", "s_per_allreduce"),
        ("ddp_world1", "ddp_wrapper_overhead"),
        ("resume_ddp", "resumed_at_step"),
        ("profile", "trace_mb"),
    ]:
        r = got.get((case, figure))
        assert r is not None and r["status"] == "ok" and float(r["value"]) > 0, (case, figure, rows)
    assert got[("sweep_bf16_b4", "images_per_s")]["goal"] == ">= 15000"
    assert (out / "profile_trace.json.gz").stat().st_size > 1000
    carried = any(w.startswith("deepspeed-") for w in wheels), any(w.startswith("webdataset-") for w in wheels)
    statuses = {r["case"]: r["status"] for r in rows}
    assert statuses["deepspeed_zero1"] == ("ok" if carried[0] else "skip"), rows
    assert statuses["embed"] == ("ok" if carried[1] else "skip"), rows
    print(p.stdout[-3000:], file=sys.stderr)
