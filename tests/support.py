"""Helpers shared by the test files: one copy of each, imported as ``support`` (pytest.ini puts
tests/ on sys.path). Not a test module and not conftest: no fixtures here (those stay in
conftest.py), only paths, the tiny real training run, launcher commands, the one-line-error checks
and the synthetic FITS cutouts that ingest, similar and the formats tests all write.

Everything runs the real components (simulator, trainer, CLI); sizes are small, nothing is mocked."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent  # the venv's bin: mpiexec, torchrun, hpc-lensiam
DEG = 1 / 3600.0  # one arcsec in degrees


# ------------------------------------------------------------------------------ data and training
def leave_spawned_rank() -> None:
    """End a ``torch.multiprocessing.spawn`` worker that used gloo without the interpreter's finalization.
    Such workers aborted there after saving their results ("terminate called without an active
    exception", SIGABRT, now and then in full CI runs: torch 2.14 + gloo), the teardown the CLI's torchrun
    ranks skip the same way (``hpc_lensiam.core.runtime.exit_torchrun_rank``). Call it last, on success
    only, so that an exception still reaches spawn's error report."""
    from hpc_lensiam.core.runtime import leave_now

    leave_now(0)


def simulate_into(out: Path, **kw) -> Path:
    """Shards made by the real simulator (``simulate_shards``) into ``out``, without a progress bar."""
    from hpc_lensiam.simulate.writer import simulate_shards

    simulate_shards(out_dir=str(out), progress=False, **kw)
    return out


# The tiny training recipe every trainer test starts from: a resnet18 with small heads, 2 steps of 8
# per rank, no loader workers, a metrics row per step.
TINY_TRAIN = dict(
    arch="resnet18",
    batch_size=8,
    max_steps=2,
    epochs=1,
    workers=0,
    proj_dim=64,
    pred_dim=16,
    log_every=1,
)


def tiny_config(data, out, **kw):
    """The real TrainConfig of the tiny recipe on ``data`` into ``out``; ``kw`` overrides any field,
    and ``field=None`` leaves it unset (train_config drops None: the default or the method's recipe)."""
    from hpc_lensiam.train.loop import train_config

    return train_config(None, **{**TINY_TRAIN, "data": str(data), "out": str(out), **kw})


def train_tiny(data, out, **kw) -> Path:
    """The real trainer on the tiny recipe (:func:`tiny_config`): a run folder in the real format."""
    from hpc_lensiam.train.loop import train

    train(tiny_config(data, out, **kw))
    return out


def torchrun_cmd(nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m hpc_lensiam`` from this venv: append the subcommand."""
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "hpc_lensiam"]


def launcher_env(**extra: str) -> dict[str, str]:
    """This process's environment for a launcher child, without the RANK/WORLD_SIZE/LOCAL_RANK that a
    parent torchrun may have set (the child would take itself for one of that run's workers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **extra}


def rerecord_shard(data_dir: Path, name: str) -> None:
    """Make the manifest vouch for shard ``name`` as it now is (size, sha256): a test that edits a
    shard's content on purpose models a bad sample written by the simulator, not a damaged file."""
    from hpc_lensiam.core.io import sha256_file
    from hpc_lensiam.shards.manifest import MANIFEST_NAME

    path = Path(data_dir) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(size=(Path(data_dir) / name).stat().st_size, sha256=sha256_file(Path(data_dir) / name))
    path.write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------ bad input
def one_error_line(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """A command refused as bad input: exit code 2, exactly one stderr line of ours and it is
    ``hpc-lensiam: error: ...``, no traceback. Returns that line. (Other stderr lines may stand
    beside it: simulate's progress bar and its "note:", a launcher's own output.)"""
    assert proc.returncode == 2, proc.stderr[-tail:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("hpc-lensiam")]
    assert len(lines) == 1 and lines[0].startswith("hpc-lensiam: error: "), proc.stderr[-tail:]
    assert "Traceback" not in proc.stderr, proc.stderr[-tail:]
    return lines[0]


def only_error_line(proc: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """As :func:`one_error_line`, stricter: the whole of stderr is that one line (no launcher output,
    no progress bar). Returns it."""
    assert proc.returncode == 2, proc.stderr[-tail:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpc-lensiam: error: "), proc.stderr[-tail:]
    return lines[0]


def main_error_line(capsys, argv) -> str:
    """The CLI in this process refuses ``argv``: ``main`` returns 2 and what it wrote to stderr (since
    capsys was last read) is one line, ``hpc-lensiam: error: ...``. Returns that line."""
    from hpc_lensiam.cli import main

    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpc-lensiam: error: "), err
    return err[0]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    from hpc_lensiam.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ------------------------------------------------------------------------------ synthetic files
def write_embeddings(path: Path, features: np.ndarray, params: dict | None, keys) -> None:
    """An embeddings file in embed's HDF5 layout, two views per key, from given features (and lens
    parameters, if any); its ``train_mode`` attribute is the file's stem."""
    import h5py

    with h5py.File(path, "w") as f:
        f["features"] = features.astype(np.float32)
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        f["view"] = np.tile([1, 2], len(keys) // 2).astype(np.int8)
        f["pair_id"] = np.unique(keys, return_inverse=True)[1]
        if params is not None:
            g = f.create_group("params")
            for k, v in params.items():
                g[k] = v
        f.attrs["train_mode"] = path.stem


def write_fits(
    path: Path,
    data: np.ndarray,
    scale_arcsec: float | None = 0.03,
    cd=None,
    name="SCI_FLUX",
    rms: np.ndarray | None = None,
    weight: np.ndarray | None = None,
) -> Path:
    """A multi-extension FITS like a survey cutout: empty primary, the image with a TAN WCS
    (CD matrix, default north up / east left), optionally an RMS or weight extension."""
    from astropy.io import fits

    hdr = fits.Header()
    if scale_arcsec is not None:
        m = np.array(cd if cd is not None else [[-scale_arcsec, 0.0], [0.0, scale_arcsec]]) * DEG
        ny, nx = data.shape
        hdr.update(
            CTYPE1="RA---TAN",
            CTYPE2="DEC--TAN",
            CUNIT1="deg",
            CUNIT2="deg",
            CRVAL1=150.0,
            CRVAL2=2.0,
            CRPIX1=(nx + 1) / 2,
            CRPIX2=(ny + 1) / 2,
            CD1_1=m[0, 0],
            CD1_2=m[0, 1],
            CD2_1=m[1, 0],
            CD2_2=m[1, 1],
        )
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(data.astype(np.float32), header=hdr, name=name)]
    if rms is not None:
        hdus.append(fits.ImageHDU(rms.astype(np.float32), name=name.replace("_FLUX", "_RMS")))
    if weight is not None:
        hdus.append(fits.ImageHDU(weight.astype(np.float32), name="WHT"))
    fits.HDUList(hdus).writeto(path)
    return path


def sky_image(n: int, scale: float, blobs, background: float = 0.0, noise: float = 0.0, seed: int = 0):
    """(n, n) image in the FITS sky layout (column 0 = east): Gaussian blobs at (east, north) arcsec
    offsets from the centre, each with total flux ``flux``; returns the image."""
    rng = np.random.default_rng(seed)
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.full((n, n), background, np.float64)
    for east, north, flux, sigma in blobs:
        x0, y0 = c - east / scale, c + north / scale  # east-left: RA grows to smaller columns
        g = np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * (sigma / scale) ** 2))
        img += flux * g / g.sum()
    return img + noise * rng.normal(size=img.shape)


def params_of(out: Path) -> list[tuple[str, np.ndarray, dict]]:
    """Every (key, image, params) in the shards of ``out``, shard by shard, in tar order."""
    rows = []
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as t:
            names = t.getnames()
            for n in names:
                if n.endswith(".image.npy"):
                    key = n.split(".")[0]
                    img = np.load(io.BytesIO(t.extractfile(n).read()))
                    rows.append((key, img, json.loads(t.extractfile(f"{key}.params.json").read())))
    return rows
