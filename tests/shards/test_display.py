"""Pictures an astronomer can read (issue 27): the asinh stretch from the noise, the arcsec scale bar,
captions that fit, the layout of one or two images, --stretch on every figure command, train's
loss.png."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

import support
from support import main_error_line
from hpc_lensiam.cli import main
from hpc_lensiam.shards import display

PNG = b"\x89PNG\r\n\x1a\n"


def lens_with_faint_arc(sigma: float = 0.003, n: int = 64, seed: int = 0):
    """A bright compact core (peak ~1) and a ring at radius 20 px, 3 sigma above the sky, plus noise;
    max-normalised as the simulator and ingest do. Returns (image, arc mask, sky mask, sigma)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(x, y)
    core = np.exp(-0.5 * (r / 1.5) ** 2)
    arc = 3 * sigma * np.exp(-0.5 * ((r - 20) / 1.2) ** 2)
    img = core + arc + rng.normal(0, sigma, (n, n))
    top = img.max()
    return (img / top).astype(np.float32), np.abs(r - 20) < 0.7, r > 26, sigma / top


def test_asinh_shows_a_3_sigma_arc_beside_a_bright_core_linear_does_not():
    img, arc, sky, sigma = lens_with_faint_arc()
    assert display.mad_sigma(img) == pytest.approx(sigma, rel=0.15)  # the sky dominates: MAD is the noise
    lift = {}
    for kind in display.STRETCHES:
        y = display.stretch(img, kind)
        assert y.dtype == np.float32 and y.min() >= 0 and y.max() == pytest.approx(1.0)
        lift[kind] = float(y[arc].mean() - y[sky].mean())  # how much brighter the arc is than the sky
    assert lift["asinh"] > 0.15, lift  # visible
    assert lift["log"] > 0.1, lift
    assert lift["linear"] < 0.01, lift  # ~0: invisible on the old linear 0-1 scale
    # the core still saturates to white and the sky sits near black under asinh
    y = display.stretch(img, "asinh")
    assert y.max() == 1.0 and float(np.median(y[sky])) < 0.15


def test_noise_sigma_prefers_the_recorded_noise_then_the_mad():
    img, _, _, sigma = lens_with_faint_arc()
    assert display.noise_sigma(img, {"ingest": {"background_rms": 0.02, "flux_scale": 4.0}}) == (
        0.005,
        "background_rms",
    )
    # resampled 0.05"/px -> 0.1"/px: each pixel sums 4 independent ones, the noise doubles; upsampling
    # 0.1 -> 0.05 spreads a pixel over 4 (each holds a quarter of its flux and noise)
    down = {"background_rms": 0.02, "flux_scale": 4.0, "pixel_scale_arcsec": 0.05, "target_pixel_scale_arcsec": 0.1}
    assert display.noise_sigma(img, {"ingest": down})[0] == pytest.approx(0.01)
    up = {**down, "pixel_scale_arcsec": [0.1, 0.1], "target_pixel_scale_arcsec": 0.05}
    assert display.noise_sigma(img, {"ingest": up})[0] == pytest.approx(0.005 / 4)
    views = {"views": [{"noise_sigma": 0.01}, {"noise_sigma": 0.03}]}
    assert display.noise_sigma(img, views, view=2) == (0.03, "simulated noise_sigma")
    s, where = display.noise_sigma(img, {"ingest": {"file": "x.fits"}})
    assert where == "MAD" and s == pytest.approx(sigma, rel=0.15)
    flat = np.zeros((8, 8), np.float32)  # noise-free: no division by zero, a finite display
    assert np.isfinite(display.stretch(flat, "asinh")).all()
    with pytest.raises(display.UserError, match=r"--stretch: unknown stretch 'sqrt' \(expected one of: asinh"):
        display.stretch(img, "sqrt")


@pytest.mark.parametrize(
    "scale, npix, arcsec, pixels",
    [
        (0.1, 64, 1.0, 10.0),
        (0.05, 110, 1.0, 20.0),
        (0.04, 48, 0.25, 6.25),
        (0.186, 215, 5.0, 5 / 0.186),
        (0.2, 220, 10.0, 50.0),
    ],
)
def test_scale_bar_is_a_round_length_in_pixels_of_the_pixel_scale(scale, npix, arcsec, pixels):
    assert display.scale_bar(scale, npix) == pytest.approx((arcsec, pixels))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    fig, ax = plt.subplots()
    display.draw_image(ax, np.ones((npix, npix)), "asinh", None, scale)
    (bar,) = [a for a in ax.artists if isinstance(a, AnchoredSizeBar)]
    assert bar.size_bar.get_children()[0].get_width() == pytest.approx(pixels)  # data units = pixels
    assert bar.txt_label.get_text() == f'{arcsec:g}"'
    plt.close(fig)
    assert display.arcsec_label(0.5) == '0.5"' and display.arcsec_label(1.0) == '1"'


def _texts_do_not_overlap(fig) -> None:
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    from matplotlib.text import Text

    texts = {id(t): t for t in fig.findobj(Text) if t.get_text() and t.get_visible()}.values()
    boxes = [(t.get_text(), t.get_window_extent(r)) for t in texts if t.get_window_extent(r).width > 0]
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), f"{ta!r} overlaps {tb!r}"
    W = fig.get_window_extent(r)
    for t, b in boxes:
        assert b.x0 >= W.x0 - 1 and b.x1 <= W.x1 + 1, f"{t!r} leaves the figure"
    for ax in fig.axes:
        t = ax.title
        if t.get_text():  # each caption within its own panel's width
            b, a = t.get_window_extent(r), ax.get_window_extent(r)
            assert b.x0 >= a.x0 - 1 and b.x1 <= a.x1 + 1, t.get_text()


@pytest.mark.parametrize("n", [1, 2, 7])
def test_captions_fit_their_panels_and_one_or_two_images_get_a_compact_layout(n):
    img, _, _, _ = lens_with_faint_arc()
    long = "102020532_NEG589257492489565961_VIS_FLUX_a_very_long_file_name.fits  θE=1.23  γ=2.01  e1=+0.12"
    panels = [
        {"image": img, "caption": f"#{i}  cos 0.123\n000000_00000{i}\n{long}", "pixel_scale": 0.1} for i in range(n)
    ]
    fig = display.panel_figure(panels, "a long title " * 8 + "; asinh stretch, softening 2 x noise sigma", "asinh")
    try:
        images = [ax for ax in fig.axes if ax.images]
        assert len(images) == n and len(fig.axes) == n  # no empty cells
        if n <= 2:
            w, h = fig.get_size_inches()
            assert w <= 2 * 3.3 and h <= 4.6  # one row of large panels, not a grid
            assert len({round(ax.get_position().y0, 3) for ax in images}) == 1
        _texts_do_not_overlap(fig)
        cap = images[0].get_title(loc="left")
        assert "…" in cap and cap.endswith("θE=1.23  γ=2.01  e1=+0.12")  # the file name gave way
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_grid_shape():
    assert display.grid_shape(1, 6) == (1, 1)
    assert display.grid_shape(2, 6) == (1, 2)
    assert display.grid_shape(12, 6) == (2, 6)
    assert display.grid_shape(8, 4, step=2) == (2, 4)  # pairs stay side by side
    assert display.grid_shape(2, 4, step=2) == (1, 2)


# ------------------------------------------------------------------------------------ commands
BAD_STRETCH = "hpc-lensiam: error: --stretch: 'bogus' is not one of asinh, linear, log"


def test_bad_stretch_is_one_line_before_any_compute(lensiam_shards, tmp_path, capsys):
    out = tmp_path / "x.png"
    runs = [
        ["show", str(lensiam_shards), "--out", str(out), "--stretch", "bogus"],
        ["similar", "--embeddings", str(tmp_path / "none.h5"), "--anomaly", "--out", str(out), "--stretch", "bogus"],
        ["umap", "--embeddings", str(tmp_path / "none.h5"), "--out", str(out), "--stretch", "bogus"],
        ["ingest", str(tmp_path / "none.npy"), "--out", str(tmp_path / "d"), "--preview", str(out)]
        + ["--stretch", "bogus"],
    ]
    for argv in runs:
        assert main_error_line(capsys, argv) == BAD_STRETCH, argv
    assert not out.exists() and not (tmp_path / "d").exists()
    for cmd in ("show", "similar", "umap", "ingest"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "--stretch {asinh,linear,log}" in capsys.readouterr().out, cmd


@pytest.mark.parametrize("stretch", ["asinh", "linear", "log"])
def test_show_draws_with_each_stretch(lensiam_shards, tmp_path, stretch, capsys):
    out = tmp_path / f"{stretch}.png"
    assert main(["show", str(lensiam_shards), "--out", str(out), "-n", "2", "--stretch", stretch]) == 0
    assert out.read_bytes()[:8] == PNG and f"({stretch} stretch)" in capsys.readouterr().out


def test_ingest_preview_draws_the_ingested_cutouts(tmp_path, capsys):
    rng = np.random.default_rng(3)
    files = []
    for i in range(2):
        img, _, _, _ = lens_with_faint_arc(n=80, seed=i)
        files.append(tmp_path / f"lens{i}.npy")
        np.save(files[-1], (img * 50 + rng.normal(0, 0.1, img.shape)).astype(np.float32))
    out, png = tmp_path / "real", tmp_path / "preview.png"

    def argv(out):
        return ["ingest", *map(str, files), "--out", str(out), "--input-pixel-scale", "0.05", "--num-pix", "64"]

    assert main(argv(out) + ["--preview", str(png), "--stretch", "log"]) == 0
    assert png.read_bytes()[:8] == PNG
    assert f"ingest --preview: drew 2 samples from {out} to {png} (log stretch)" in capsys.readouterr().out
    # a --preview that cannot be written is refused before anything is ingested
    (tmp_path / "blocker").write_text("")
    bad = argv(tmp_path / "real2") + ["--preview", str(tmp_path / "blocker" / "p.png")]
    assert "--preview" in main_error_line(capsys, bad) and not (tmp_path / "real2").exists()


def test_train_writes_loss_png_beside_metrics_csv(lensiam_shards, tmp_path):
    run = support.train_tiny(lensiam_shards, tmp_path / "run")
    assert (run / "metrics.csv").is_file()
    assert (run / "loss.png").read_bytes()[:8] == PNG
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]  # written atomically


def test_loss_plot_failure_is_one_warning_line_never_an_exception(tmp_path, capsys):
    assert display.plot_loss_safely(tmp_path / "missing.csv", tmp_path / "loss.png") is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train: warning: loss plot") and not (tmp_path / "loss.png").exists()
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,epoch,loss,lr,z_std\n")  # a run stopped before its first row: nothing to draw
    assert display.plot_loss_safely(csv, tmp_path / "loss.png") is False and not (tmp_path / "loss.png").exists()
    csv.write_text("step,epoch,loss,lr,z_std\n1,0.1,-0.5,0.01,0.02\n2,0.2,-0.6,0.02,0.021\n")
    assert display.plot_loss_safely(csv, tmp_path / "loss.png", 0.02) is True
    assert Path(tmp_path / "loss.png").read_bytes()[:8] == PNG
