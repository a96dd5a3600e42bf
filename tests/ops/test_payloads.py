"""Nothing a file says gets executed (issue 25, break 1).

A pickle can name any Python callable, and ``torch.load(weights_only=False)`` calls it. Every place a
file from outside the run can arrive is handed a file whose payload, when unpickled, creates a marker
file; the package must refuse it in one line and the marker must never appear. The payload is real:
the same file loaded with ``weights_only=False`` does create the marker (checked first, so a test that
passes is not a payload that never fires).

Fine-tuned models (`finetune --save-model`) are safetensors files, which hold raw tensors and strings.
FITS (PSF banks, COSMOS, ingest; astropy reads numbers and header cards) and HDF5 (embeddings; h5py
stores numbers and strings, it never unpickles) have no such path: a pickle planted in a PSF file and
in an embeddings file is shown to stay bytes. ``.npy`` can (object arrays are pickles): every
``.npy`` reader loads with ``allow_pickle=False`` and is tested here too.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_lensiam.core.errors import UserError
from support import BIN, REPO, one_error_line, simulate_into, train_tiny

TINY = dict(
    arch="resnet18", batch_size=8, epochs=5, workers=0, proj_dim=64, pred_dim=16, engine="deepspeed", zero_stage=1
)


class Payload:
    """Unpickled, it opens (creates) ``marker``: the stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _fires(path: Path, marker: Path) -> None:
    """The planted file really runs code when loaded the unsafe way (then the marker is removed)."""
    torch.load(path, weights_only=False)
    assert marker.exists(), "the payload does not fire: this test would prove nothing"
    marker.unlink()


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / "hpc-lensiam"), *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def _refused(proc: subprocess.CompletedProcess, marker: Path, name: str) -> str:
    assert not marker.exists(), f"code from {name} ran"
    line = one_error_line(proc)
    assert "weights_only=False" not in proc.stderr, proc.stderr[-2000:]
    assert name in line, line
    return line


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return simulate_into(
        tmp_path_factory.mktemp("payload") / "data",
        num_samples=8,
        shard_size=4,
        mode="lensiam",
        seed=5,
        overrides={"instrument": {"num_pix": 32}},
    )


@pytest.mark.slow
def test_deepspeed_model_file_given_to_export_and_embed(tmp_path, data):
    """The reviewer's case: ``{"module": Evil()}`` as ``mp_rank_00_model_states.pt``, given as a file to
    ``export`` and as a DeepSpeed folder (``latest``) to ``embed``."""
    marker = tmp_path / "ran"
    tag = tmp_path / "evil" / "step_00000002"
    evil = _plant(tag / "mp_rank_00_model_states.pt", {"module": Payload(marker), "global_steps": 2})
    (tmp_path / "evil" / "latest").write_text("step_00000002")
    _fires(evil, marker)

    _refused(_cli("export", "--checkpoint", evil, "--out", tmp_path / "b.pt"), marker, "mp_rank_00_model_states.pt")
    assert not (tmp_path / "b.pt").exists()
    line = _refused(
        _cli("embed", "--checkpoint", tmp_path / "evil", "--data", data, "--out", tmp_path / "e.h5"),
        marker,
        "mp_rank_00_model_states.pt",
    )
    assert "refused" in line, line


@pytest.mark.slow
def test_our_checkpoint_files_and_resume(tmp_path, data):
    """``last.pt`` and ``step_*.pt`` (export, embed, and ``train --resume`` with its fall-back)."""
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    ck = run / "checkpoints"
    evil = _plant(ck / "last.pt", {"model": Payload(marker), "step": 1})
    _plant(ck / "step_000001.pt", {"model": Payload(marker), "step": 1})
    _fires(evil, marker)

    _refused(_cli("export", "--checkpoint", evil, "--out", tmp_path / "b.pt"), marker, "last.pt")
    _refused(_cli("embed", "--checkpoint", run, "--data", data, "--out", tmp_path / "e.h5"), marker, "last.pt")
    from hpc_lensiam.train.checkpoint import load_for_resume

    with pytest.raises(UserError, match="no readable step_"):
        load_for_resume(ck)
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeed_optimizer_file_on_resume(tmp_path, data):
    """DeepSpeed reads its own files with ``weights_only=False``: a planted ZeRO-1 optimizer-state file
    in a real run folder, then ``--resume`` with the same engine, stage and ranks (the full-restore
    path that hands the folder to DeepSpeed). A genuine file of the same run still resumes."""
    run = train_tiny(data, tmp_path / "run", **TINY)
    (optim,) = (run / "checkpoints" / "deepspeed").glob("step_*/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    genuine = optim.read_bytes()
    marker = tmp_path / "ran"
    _plant(optim, {"optimizer_state_dict": Payload(marker), "ds_config": {}, "ds_version": "0.19.8"})
    _fires(optim, marker)

    from hpc_lensiam.train.loop import train, train_config

    resume = train_config(**{**TINY, "data": str(data), "out": str(run), "max_steps": 3})
    with pytest.raises(UserError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        train(resume, resume=True)
    assert not marker.exists()

    optim.write_bytes(genuine)  # DeepSpeed's own classes (LossScaler, ZeroStageEnum, ...) are allowed
    train(resume, resume=True)
    from hpc_lensiam.models.weights import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_backbone_file_given_to_finetune(tmp_path, data):
    marker = tmp_path / "ran"
    evil = _plant(tmp_path / "backbone.pt", {"conv1.weight": Payload(marker)})
    _fires(evil, marker)
    _refused(
        _cli("finetune", "--backbone", evil, "--train", data, "--test", data, "--arch", "resnet18", "--epochs", "1"),
        marker,
        "backbone.pt",
    )


def test_npy_object_arrays_are_never_unpickled(tmp_path, data):
    """``.npy`` object arrays are pickles: ingest's ``.npy`` input and a shard's npy member."""
    marker = tmp_path / "ran"
    arr = np.empty(1, dtype=object)
    arr[0] = Payload(marker)
    np.save(tmp_path / "cutout.npy", arr, allow_pickle=True)
    np.load(tmp_path / "cutout.npy", allow_pickle=True)
    assert marker.exists()
    marker.unlink()

    _refused(_cli("ingest", tmp_path / "cutout.npy", "--out", tmp_path / "ing"), marker, "cutout.npy")

    from hpc_lensiam.shards.manifest import decode_npy

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_npy(buf.getvalue())
    assert not marker.exists()


def test_saved_model_given_to_predict(tmp_path, data):
    """A fine-tuned model is a safetensors file (raw tensors and strings): a pickle under that name is
    refused as "not a safetensors model file", never unpickled."""
    marker = tmp_path / "ran"
    pickled = _plant(tmp_path / "model.pt", {"fc.weight": Payload(marker)})
    _fires(pickled, marker)  # (torch.load itself hands a *.safetensors name to safetensors: fire it as .pt)
    evil = tmp_path / "model.safetensors"
    pickled.rename(evil)
    _refused(_cli("predict", "--model", evil, "--data", data, "--out", tmp_path / "c.csv"), marker, "model.safetensors")


def _pickled(marker: Path) -> bytes:
    """The payload's pickle bytes, checked to fire when unpickled (then the marker is removed)."""
    import pickle

    blob = pickle.dumps(Payload(marker))
    pickle.loads(blob)
    assert marker.exists(), "the payload does not fire: this test would prove nothing"
    marker.unlink()
    return blob


def test_psf_fits_file_with_a_pickle_inside(tmp_path):
    """A PSF bank file is FITS: a pickle stored in it (a binary table HDU of pickle bytes beside the PSF
    image) is only ever bytes to astropy. Simulating with the file never runs it."""
    from astropy.io import fits

    from hpc_lensiam.simulate.writer import simulate_shards

    marker = tmp_path / "ran"
    yy, xx = np.mgrid[-10:11, -10:11]
    psf = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    blob = np.frombuffer(_pickled(marker), dtype=np.uint8)
    table = fits.BinTableHDU.from_columns([fits.Column(name="payload", format=f"{blob.size}B", array=blob[None])])
    path = tmp_path / "psf.fits"
    fits.HDUList([fits.PrimaryHDU(psf / psf.sum()), table]).writeto(path)
    simulate_shards(
        out_dir=str(tmp_path / "ds"),
        num_samples=2,
        shard_size=2,
        mode="lensiam",
        seed=0,
        overrides={"instrument": {"num_pix": 32}},
        psf_files=[str(path)],
        psf_pixel_scale_arcsec=0.05,
        progress=False,
    )
    assert not marker.exists()


def test_embeddings_hdf5_with_a_pickle_inside(tmp_path, data):
    """An embeddings file is HDF5: pickle bytes planted in it (an opaque dataset and an attribute) stay
    bytes for `probe` and `umap`, which read it whole."""
    import h5py

    from hpc_lensiam.embed.extract import extract_embeddings

    marker = tmp_path / "ran"
    emb = tmp_path / "emb.h5"
    extract_embeddings("none", str(data), str(emb), progress=False, arch="resnet18", seed=0)
    with h5py.File(emb, "r+") as f:
        f.create_dataset("payload", data=np.void(_pickled(marker)))
        f.attrs["payload"] = np.void(_pickled(marker))
    proc = _cli("probe", "--embeddings", emb, "--json", tmp_path / "p.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _cli("umap", "--embeddings", emb, "--out", tmp_path / "u.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()
