"""`python -m runtime.sample`: the files it writes (decoded independently), reproducible noise, and
bad arguments that exit 2 with the problem named and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.images import to_uint8
from runtime.pipeline import Pipeline
from runtime.sample import main
from runtime.sampling import sample_ddpm
from runtime.schedule import make_schedule
from tests.builds import SPECS

ROOT = Path(__file__).resolve().parents[2]
SIZE, UP_SIZE = SPECS["unet"]["image_size"], SPECS["upsampler"]["image_size"]


def sample_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (the same `main` as `python -m runtime.sample`)."""
    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _decode_png(path: Path) -> np.ndarray:
    image = pytest.importorskip("PIL.Image")
    with image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_cascade_writes_grid_pngs_and_npz(build_dir, tmp_path):
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "runtime.sample", "--engine", str(build_dir / "unet.onnx")]
    args = "--classes 1,2,3 --scale 2 --steps ddim10 --upsampler-steps ddim5 --json".split()
    proc = subprocess.run(
        [*cli, "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["num_samples"] == 3 and summary["labels"] == [1, 2, 3]
    assert summary["engines"] == {
        "unet": "unet.onnx", "classifier": "classifier_grad.onnx", "upsampler": "upsampler.onnx"
    }  # fmt: skip
    pngs = [f"sample_{j:06d}_class{c}.png" for j, c in enumerate([1, 2, 3])]
    names = {"samples.npz", "grid.png", "base_grid.png", "sample_run.json", *pngs}
    assert {p.name for p in out.iterdir()} == names  # and no temporary files

    with np.load(out / "samples.npz") as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (3, UP_SIZE, UP_SIZE, 3)
    np.testing.assert_array_equal(labels, [1, 2, 3])
    for j, name in enumerate(pngs):
        np.testing.assert_array_equal(_decode_png(out / name), images[j])

    # The grid: 2 x 2 cells of 4x-enlarged samples (128 px) with 2 px white borders.
    grid = _decode_png(out / "grid.png")
    assert grid.shape == (2 * 130 + 2, 2 * 130 + 2, 3)
    for j in range(3):
        r, c = divmod(j, 2)
        cell = grid[2 + 130 * r : 130 * r + 130, 2 + 130 * c : 130 * c + 130]
        np.testing.assert_array_equal(cell, np.kron(images[j], np.ones((4, 4, 1), np.uint8)))
    assert (grid[132:, 132:] == 255).all()  # the empty fourth cell
    assert _decode_png(out / "base_grid.png").shape == (2 * 130 + 2, 2 * 130 + 2, 3)

    # What the CLI wrote is what the pipeline computes for these arguments (seed 0).
    with Pipeline.from_manifest(build_dir) as pipe:
        want = pipe.sample([1, 2, 3], scale=2.0, steps="ddim10", upsampler_steps="ddim5", seed=0)
    np.testing.assert_array_equal(images, want.images)


def test_save_trajectory(build_dir, tmp_path, capsys):
    traj = tmp_path / "traj.npz"
    rc, out, err = sample_cli(
        capsys, "--engine", build_dir, "--classes", "4,5", "--steps", "ddim10", "--no-upsampler",
        "--no-classifier", "--save-trajectory", traj, "--out", tmp_path / "out",
    )  # fmt: skip
    assert rc == 0, err
    assert "wrote 2 samples" in out
    with np.load(traj) as npz:
        assert sorted(npz.files) == ["pred_xstart", "t", "x"]
        assert npz["x"].shape == npz["pred_xstart"].shape == (10, 2, 3, SIZE, SIZE)
        # ddim10 over 1000 steps keeps every 100th timestep, visited from 900 down to 0.
        np.testing.assert_array_equal(npz["t"], np.arange(900, -1, -100))
        assert np.abs(npz["pred_xstart"]).max() <= 1  # clipped x0 predictions, unguided
        x = npz["x"]
    with np.load(tmp_path / "out" / "samples.npz") as npz:
        assert npz["arr_0"].shape == (2, SIZE, SIZE, 3)
    # The first state is the seeded initial noise of each sample.
    for j in range(2):
        rng = np.random.default_rng([0, j, 0])
        np.testing.assert_array_equal(x[0, j], rng.standard_normal((3, SIZE, SIZE), np.float32))


def test_init_and_step_noise_reproduce_a_trajectory(build_dir, tmp_path, capsys, reference_models):
    pytest.importorskip("torch")
    from export import reference

    labels, steps = np.array([0, 9], np.int64), 6
    rng = np.random.default_rng(123)
    x_T = rng.standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    noise = rng.standard_normal((steps, 2, 3, SIZE, SIZE), dtype=np.float32)
    np.save(tmp_path / "init.npy", x_T)
    np.save(tmp_path / "steps.npy", noise)
    runs = []
    for seed in (1, 2):  # the seed no longer matters
        out = tmp_path / f"out{seed}"
        rc, _, err = sample_cli(
            capsys, "--engine", build_dir / "unet.onnx", "--classes", "0,9", "--scale", "2",
            "--sampler", "ddpm", "--steps", steps, "--no-upsampler", "--seed", seed,
            "--init-noise", tmp_path / "init.npy", "--step-noise", tmp_path / "steps.npy",
            "--save-trajectory", out / "traj.npz", "--out", out,
        )  # fmt: skip
        assert rc == 0, err
        with np.load(out / "samples.npz") as s, np.load(out / "traj.npz") as t:
            runs.append((s["arr_0"], t["x"], t["pred_xstart"]))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)

    images, xs, _ = runs[0]
    seen = []
    final = sample_ddpm(
        reference.model_fn(reference_models["unet"], y=labels), x_T,
        make_schedule("cosine", 1000, str(steps)), learn_sigma=True,
        grad_fn=reference.grad_fn(reference_models["classifier"], labels, 2.0), noise=noise,
        callback=lambda info: seen.append(info["x"].copy()),
    )  # fmt: skip
    np.testing.assert_allclose(xs, np.stack(seen), rtol=0, atol=1e-3)
    assert np.abs(images.astype(int) - to_uint8(final)).max() <= 1


# -- bad inputs: exit 2, the problem named, nothing written ----------------------------------


def _run_error(capsys, tmp_path, engine, *args) -> str:
    out = tmp_path / "out"
    rc, stdout, err = sample_cli(
        capsys, "--engine", engine, "--out", out, "--save-trajectory", out / "t.npz", *args
    )
    assert rc == 2, (stdout, err)
    assert err.startswith("error: "), err
    assert not out.exists()
    return err


def test_missing_engine(capsys, tmp_path, build_copy):
    err = _run_error(capsys, tmp_path, tmp_path / "nowhere" / "unet.onnx", "--classes", "1")
    assert f"--engine {tmp_path / 'nowhere' / 'unet.onnx'} does not exist" in err
    err = _run_error(capsys, tmp_path, build_copy / "unet2.onnx", "--classes", "1")
    assert "unet2.onnx is not listed in" in err and "unet.onnx" in err
    os.unlink(build_copy / "unet.onnx")
    err = _run_error(capsys, tmp_path, build_copy / "unet.onnx", "--classes", "1")
    assert f"{build_copy / 'unet.onnx'} is missing, though manifest.json lists it" in err


def test_corrupt_engine(capsys, tmp_path, build_copy):
    path = build_copy / "unet.onnx"
    data = bytearray(path.read_bytes())
    data[100:200] = bytes(100)
    path.write_bytes(bytes(data))
    err = _run_error(capsys, tmp_path, path, "--classes", "1")
    assert f"{path} does not match its manifest (sha256" in err
    assert "rebuild the folder" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "1,2,3", "--batch", "32"], "batch 32 is outside the engines' range 1..16"),
        (["--classes", "1,10"], "class 10 is out of range: this build has classes 0..9"),
        (["--class", "-3", "--num-samples", "2"], "class -3 is out of range"),
        (["--classes", "1,x"], "--classes takes comma-separated integers, got '1,x'"),
        ("--classes 1 --no-classifier --scale 2".split(), "--scale with --no-classifier"),
        (["--classes", "1", "--init-noise", "missing.npy"], "cannot read --init-noise missing.npy"),
        (["--classes", "1", "--shard", "4/4"], "--shard 4/4: need 0 <= I < N"),
        (["--classes", "1", "--steps", "ddim25x"], "--steps 'ddim25x'"),
    ],
)
def test_bad_arguments(capsys, tmp_path, build_dir, args, message):
    err = _run_error(capsys, tmp_path, build_dir / "unet.onnx", "--steps", "ddim2", *args)
    assert message in err


def test_wrong_noise_shape(capsys, tmp_path, build_dir):
    np.save(tmp_path / "init.npy", np.zeros((3, 3, SIZE, SIZE), np.float32))
    err = _run_error(capsys, tmp_path, build_dir, "--classes", "1,2", "--steps", "ddim2",
                     "--init-noise", tmp_path / "init.npy")  # fmt: skip
    assert "init noise must have shape (2, 3, 16, 16), got (3, 3, 16, 16)" in err


def test_scale_without_a_classifier(capsys, tmp_path, unet_only_build):
    err = _run_error(capsys, tmp_path, unet_only_build / "unet.onnx", "--classes", "1",
                     "--scale", "2", "--steps", "ddim2")  # fmt: skip
    assert "guidance scale 2.0 needs a classifier" in err


def test_output_folder_under_a_file(capsys, tmp_path, build_dir):
    (tmp_path / "file").write_text("keep")
    out = tmp_path / "file" / "out"
    rc, _, err = sample_cli(capsys, "--engine", build_dir, "--classes", "1", "--steps", "ddim2",
                            "--out", out)  # fmt: skip
    assert rc == 2
    assert f"cannot write to output folder {out}: {tmp_path / 'file'} is a file, not a" in err
    assert (tmp_path / "file").read_text() == "keep"


def test_trajectory_path_under_a_file(capsys, tmp_path, build_dir):
    (tmp_path / "file").write_text("keep")
    traj = tmp_path / "file" / "t.npz"
    err = _run_error(capsys, tmp_path, build_dir, "--classes", "1", "--steps", "ddim2",
                     "--no-upsampler", "--save-trajectory", traj)  # fmt: skip
    assert f"{tmp_path / 'file'} is a file" in err


def test_four_shards_merge_into_the_unsharded_run(capsys, tmp_path, build_dir):
    from click.testing import CliRunner

    from export.cli import main as gdexport

    common = ["--engine", build_dir, "--num-samples", "7", "--scale", "2", "--steps", "ddim3",
              "--no-upsampler", "--seed", "11"]  # fmt: skip
    rc, _, err = sample_cli(capsys, *common, "--out", tmp_path / "whole")
    assert rc == 0, err
    for i in range(4):
        rc, _, err = sample_cli(capsys, *common, "--shard", f"{i}/4", "--out", tmp_path / f"s{i}")
        assert rc == 0, err
    shards = [str(tmp_path / f"s{i}" / "samples.npz") for i in (2, 0, 3, 1)]  # any order
    runner = CliRunner()
    res = runner.invoke(gdexport, ["merge-samples", str(tmp_path / "merged.npz"), *shards])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "merged.npz") as m, np.load(tmp_path / "whole" / "samples.npz") as w:
        np.testing.assert_array_equal(m["arr_0"], w["arr_0"])
        np.testing.assert_array_equal(m["arr_1"], w["arr_1"])
    # A missing or duplicated shard is refused and nothing is written.
    res = runner.invoke(gdexport, ["merge-samples", str(tmp_path / "bad.npz"), *shards[:3]])
    assert res.exit_code == 2 and "missing shard" in res.output
    res = runner.invoke(gdexport, ["merge-samples", str(tmp_path / "bad.npz"), *shards, shards[0]])
    assert res.exit_code == 2 and "twice" in res.output
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
        (["--num-samples", "-2"], "--num-samples must be a positive integer, got -2"),
        (["--classes", "1", "--batch", "0"], "--batch must be a positive integer, got 0"),
        (["--classes", "1", "--threads", "-1"], "--threads must be a positive integer, got -1"),
        (["--classes", "1", "--eta", "-1"], "eta must be in [0, 1]"),
        (["--classes", "1", "--eta", "nan"], "eta must be a finite number"),
        (["--classes", "1", "--seed", "-1"], "seed must be >= 0, got -1"),
        (["--classes", "1", "--scale", "-4"], "guidance scale must be >= 0"),
        (
            ["--classes", "1", "--upsampler-start-t", "5000"],
            "upsampler start timestep 5000 is past",
        ),
        (["--classes", "1", "--steps", "ddim0"], "'ddimN' needs 2 <= N <= 1000"),
        (["--class", "1", "--classes", "1,2"], "--class and --classes exclude each other"),
    ],
)
def test_bad_counts_and_ranges(capsys, tmp_path, build_dir, args, message):
    full = ["--steps", "ddim2", *args] if "--steps" not in args else args
    err = _run_error(capsys, tmp_path, build_dir, *full)
    assert message in err, err
    assert "Traceback" not in err


def test_engine_that_does_not_exist(capsys, tmp_path):
    err = _run_error(capsys, tmp_path, tmp_path / "nonexistent", "--classes", "1")
    assert f"--engine {tmp_path / 'nonexistent'} does not exist" in err


def test_trajectory_path_that_is_a_folder_is_refused_before_sampling(capsys, tmp_path, build_dir):
    (tmp_path / "traj").mkdir()
    out = tmp_path / "out"
    rc, _, err = sample_cli(capsys, "--engine", build_dir, "--classes", "1", "--steps", "ddim2",
                            "--no-upsampler", "--out", out, "--save-trajectory", tmp_path / "traj")  # fmt: skip
    assert rc == 2 and "--save-trajectory" in err and "is a folder" in err
    assert not out.exists()


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_rerun_replaces_its_output_whole(capsys, tmp_path, build_dir):
    """Two runs into one --out with other labels: the folder holds the second run alone."""
    out = tmp_path / "out"
    common = ["--engine", build_dir, "--steps", "ddim2", "--no-upsampler", "--out", out]
    assert sample_cli(capsys, *common, "--classes", "1,2,3")[0] == 0
    first = _names(out)
    assert "sample_000002_class3.png" in first
    assert sample_cli(capsys, *common, "--classes", "7")[0] == 0
    second = _names(out)
    assert "sample_000000_class7.png" in second
    assert not any(
        n.startswith("sample_0000") and "class7" not in n for n in second if n.endswith(".png")
    )
    with np.load(out / "samples.npz") as f:
        assert f["arr_1"].tolist() == [7]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_foreign_non_empty_folder_is_refused_unless_overwrite(capsys, tmp_path, build_dir):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_text("keep me")
    common = ["--engine", build_dir, "--classes", "1", "--steps", "ddim2", "--no-upsampler"]
    rc, _, err = sample_cli(capsys, *common, "--out", out)
    assert rc == 2 and "is not empty" in err and "--overwrite" in err
    assert _names(out) == {"holiday.jpg"}
    rc, _, err = sample_cli(capsys, *common, "--out", out, "--overwrite")
    assert rc == 0, err
    assert "holiday.jpg" not in _names(out) and "samples.npz" in _names(out)


def test_disk_full_writes_nothing_and_keeps_the_earlier_run(
    capsys, tmp_path, build_dir, monkeypatch
):
    import errno

    out = tmp_path / "out"
    common = ["--engine", build_dir, "--steps", "ddim2", "--no-upsampler", "--out", out]
    assert sample_cli(capsys, *common, "--classes", "1,2")[0] == 0
    before = {n: (out / n).read_bytes() for n in _names(out)}
    real = Path.write_bytes
    calls = []

    def full(self, data):
        calls.append(self.name)
        if len(calls) == 3:  # a few files in: the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    rc, _, err = sample_cli(capsys, *common, "--classes", "5,6,7")
    monkeypatch.undo()
    assert rc == 2 and "no space left on device writing" in err and "Traceback" not in err
    assert {n: (out / n).read_bytes() for n in _names(out)} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
