"""`Pipeline` on ONNX Runtime against `runtime.sampling` over the PyTorch reference callables, with
the noise the pipeline documents: sample j of a run with seed s draws its initial noise and then
its per-step noise from np.random.default_rng([s, j, 0]), its label from [s, j, 1] and the
upsampler's initial noise from [s, j, 2]."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.images import to_uint8
from runtime.manifest import ManifestError
from runtime.pipeline import Pipeline, SamplingError
from runtime.sampling import NonFiniteError, sample_ddim, sample_ddpm
from runtime.schedule import make_schedule
from tests.builds import BATCH_MAX, NUM_CLASSES, SPECS

TOL = 1e-3  # trajectory agreement of fp32 graphs with the reference
SIZE, UP_SIZE = SPECS["unet"]["image_size"], SPECS["upsampler"]["image_size"]


@pytest.fixture(scope="module")
def pipe(build_dir):
    with Pipeline.from_manifest(build_dir) as p:
        yield p


@pytest.fixture(scope="module")
def reference(reference_models):
    pytest.importorskip("torch")
    from export import reference

    return reference, reference_models


def base_noise(seed: int, n: int, steps: int, size: int = SIZE, stream: int = 0):
    """(n, 3, size, size) initial noise and (steps, n, 3, size, size) step noise, per sample."""
    x_T = np.empty((n, 3, size, size), np.float32)
    noise = np.empty((steps, n, 3, size, size), np.float32)
    for j in range(n):
        rng = np.random.default_rng([seed, j, stream])
        x_T[j] = rng.standard_normal((3, size, size), dtype=np.float32)
        for k in range(steps):
            noise[k, j] = rng.standard_normal((3, size, size), dtype=np.float32)
    return x_T, noise


def _recorder():
    xs = []
    return xs, lambda info: xs.append(info["x"].copy())


def test_pipeline_opens_the_whole_build(pipe):
    assert pipe.unet_artifact.file == "unet.onnx"
    assert pipe.classifier_artifact.file == "classifier_grad.onnx"
    assert pipe.upsampler_artifact.file == "upsampler.onnx"
    assert pipe.num_classes == NUM_CLASSES and pipe.batch_max == BATCH_MAX


def test_ddim_guided_reproduces_the_reference_trajectory(pipe, reference):
    ref, models = reference
    labels, scale, seed = np.array([1, 7, 3], np.int64), 3.0, 11
    got = pipe.sample(labels, scale=scale, steps="ddim10", seed=seed, upsample=False,
                      save_trajectory=True)  # fmt: skip
    schedule = make_schedule("cosine", 1000, "ddim10")
    x_T, _ = base_noise(seed, 3, 0)
    xs, record = _recorder()
    want = sample_ddim(
        ref.model_fn(models["unet"], y=labels), x_T, schedule, learn_sigma=True,
        grad_fn=ref.grad_fn(models["classifier"], labels, scale), callback=record,
    )  # fmt: skip
    assert got.x.shape == (3, 3, SIZE, SIZE) and got.images.shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(got.trajectory["x"], np.stack(xs), rtol=0, atol=TOL)
    np.testing.assert_allclose(got.x, want, rtol=0, atol=TOL)
    np.testing.assert_array_equal(got.trajectory["t"], np.arange(900, -1, -100))
    # Guidance changed something: the unguided run ends elsewhere.
    unguided = pipe.sample(labels, scale=0, steps="ddim10", seed=seed, upsample=False)
    assert np.abs(unguided.x - got.x).max() > 10 * TOL


def test_ddpm_guided_with_step_noise_reproduces_the_reference(pipe, reference):
    ref, models = reference
    labels, scale, seed, steps = np.array([0, 9], np.int64), 2.0, 5, 8
    got = pipe.sample(labels, scale=scale, steps=str(steps), sampler="ddpm", seed=seed,
                      upsample=False, save_trajectory=True)  # fmt: skip
    schedule = make_schedule("cosine", 1000, str(steps))
    x_T, noise = base_noise(seed, 2, steps)
    xs, record = _recorder()
    want = sample_ddpm(
        ref.model_fn(models["unet"], y=labels), x_T, schedule, learn_sigma=True,
        grad_fn=ref.grad_fn(models["classifier"], labels, scale), noise=noise, callback=record,
    )  # fmt: skip
    np.testing.assert_allclose(got.trajectory["x"], np.stack(xs), rtol=0, atol=TOL)
    np.testing.assert_allclose(got.x, want, rtol=0, atol=TOL)
    # The same noise passed explicitly gives the same samples.
    again = pipe.sample(labels, scale=scale, steps=str(steps), sampler="ddpm", seed=999,
                        upsample=False, init_noise=x_T, step_noise=noise)  # fmt: skip
    np.testing.assert_array_equal(again.x, got.x)


def test_cascade_reproduces_the_reference(pipe, reference):
    ref, models = reference
    labels, scale, seed = np.array([2, 4], np.int64), 1.5, 3
    got = pipe.sample(labels, scale=scale, steps="ddim6", upsampler_steps="ddim4", seed=seed)
    x_T, _ = base_noise(seed, 2, 0)
    base = sample_ddim(
        ref.model_fn(models["unet"], y=labels), x_T, make_schedule("cosine", 1000, "ddim6"),
        learn_sigma=True, grad_fn=ref.grad_fn(models["classifier"], labels, scale),
    )  # fmt: skip
    up_T, _ = base_noise(seed, 2, 0, size=UP_SIZE, stream=2)
    want = sample_ddim(
        ref.model_fn(models["upsampler"], y=labels, low_res=base), up_T,
        make_schedule("linear", 1000, "ddim4"), learn_sigma=True,
    )  # fmt: skip
    assert got.x.shape == (2, 3, UP_SIZE, UP_SIZE) and got.images.shape == (2, UP_SIZE, UP_SIZE, 3)
    assert got.base_images.shape == (2, SIZE, SIZE, 3)
    assert np.abs(got.base_images.astype(int) - to_uint8(base)).max() <= 1
    np.testing.assert_allclose(got.x, want, rtol=0, atol=TOL)
    np.testing.assert_array_equal(got.images, to_uint8(got.x))


def test_results_do_not_depend_on_batch_size_or_sharding(pipe):
    labels = [1, 2, 3, 4, 5]
    kw = dict(scale=2.0, steps="ddim5", seed=7, upsample=False)
    whole = pipe.sample(labels, batch=5, **kw)
    ones = pipe.sample(labels, batch=1, **kw)
    twos = pipe.sample(labels, batch=2, **kw)
    np.testing.assert_array_equal(ones.images, whole.images)
    np.testing.assert_array_equal(twos.images, whole.images)
    np.testing.assert_allclose(ones.x, whole.x, rtol=0, atol=1e-5)
    # A shard starting at sample 3 gives samples 3 and 4 of the whole run.
    shard = pipe.sample(labels[3:], first_index=3, **kw)
    np.testing.assert_allclose(shard.x, whole.x[3:], rtol=0, atol=1e-5)


def test_labels_drawn_per_sample(pipe):
    got = pipe.sample(num_samples=6, scale=0, steps="ddim2", seed=4, upsample=False)
    want = [np.random.default_rng([4, j, 1]).integers(0, NUM_CLASSES) for j in range(6)]
    np.testing.assert_array_equal(got.labels, want)
    one = pipe.sample([3], num_samples=4, scale=0, steps="ddim2", upsample=False)
    np.testing.assert_array_equal(one.labels, [3, 3, 3, 3])


# -- errors -------------------------------------------------------------------------------------


class NaNAt:
    """A backend that returns NaN from call `at` on (0-based), else the real backend's output."""

    def __init__(self, backend, at: int):
        self.backend, self.at, self.calls = backend, at, 0
        self.inputs, self.outputs = backend.inputs, backend.outputs

    def __call__(self, feeds):
        out = self.backend(feeds)
        self.calls += 1
        if self.calls > self.at:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out

    def close(self):
        self.backend.close()


@pytest.mark.parametrize(
    "stage, what, size",
    [
        ("_unet", "unet stage: model output", 2 * 6 * 16**2),
        ("_clf", "unet stage: classifier gradient", 2 * 3 * 16**2),
        ("_up", "upsampler stage: model output", 2 * 6 * 32**2),
    ],
    ids=["unet", "classifier", "upsampler"],
)
def test_nan_names_the_stage_component_and_step(build_dir, stage, what, size):
    with Pipeline.from_manifest(build_dir) as p:
        timed = getattr(p, stage)
        timed.backend = NaNAt(timed.backend, at=2)
        match = f"{what} has non-finite values at sampling step 2 "
        with pytest.raises(NonFiniteError, match=match) as e:
            p.sample([1, 2], scale=1.0, steps="ddim5", upsampler_steps="ddim5")
    assert e.value.step == 2
    assert f"{size} NaN and 0 inf out of {size}" in str(e.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(labels=[1, 10]), r"class 10 is out of range: this build has classes 0\.\.9"),
        (dict(labels=[-1]), r"class -1 is out of range"),
        (dict(labels=[1], batch=BATCH_MAX + 1), r"batch 17 is outside the engines' range 1\.\.16"),
        (dict(labels=[1, 2], num_samples=3), r"2 labels given for 3 samples"),
        (dict(labels=[1], sampler="euler"), r"sampler must be one of"),
        (dict(labels=[1], steps="ddim7x"), r"--steps 'ddim7x'"),
        (dict(labels=[1, 2], init_noise=np.zeros((1, 3, 16, 16))), r"init noise must .*\(2, 3,"),
        (
            dict(labels=[1], steps="4", sampler="ddpm", step_noise=np.zeros((3, 1, 3, 16, 16))),
            r"step noise must have shape .* = \(4, 1, 3, 16, 16\)",
        ),
    ],
)
def test_bad_arguments(pipe, kwargs, match):
    with pytest.raises(SamplingError, match=match):
        pipe.sample(**kwargs)


def test_guidance_without_a_classifier(unet_only_build, build_dir):
    with Pipeline.from_manifest(unet_only_build) as p:
        assert p.classifier_artifact is None and p.upsampler_artifact is None
        with pytest.raises(SamplingError, match=r"guidance scale 2.0 needs a classifier"):
            p.sample([1], scale=2.0, steps="ddim2")
        assert p.sample([1], steps="ddim2").images.shape == (1, SIZE, SIZE, 3)  # default: unguided
    with Pipeline.from_manifest(build_dir, classifier=False, upsampler=False) as p:
        with pytest.raises(SamplingError, match=r"needs a classifier"):
            p.sample([1], scale=2.0, steps="ddim2")


def test_a_changed_engine_is_refused_before_loading(build_copy):
    path = build_copy / "upsampler.onnx"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ManifestError, match=r"upsampler\.onnx does not match its manifest"):
        Pipeline.from_manifest(build_copy)
    with Pipeline.from_manifest(build_copy, upsampler=False) as p:  # the rest still opens
        assert p.upsampler_artifact is None


def test_engine_feeds_are_checked(pipe):
    x = np.zeros((BATCH_MAX + 1, 3, SIZE, SIZE), np.float32)
    t = np.zeros(BATCH_MAX + 1, np.int64)
    with pytest.raises(BackendError, match=r"batch 17 is outside the engine's range 1\.\.16"):
        pipe.engine("unet")({"x": x, "t": t, "y": t})
    with pytest.raises(BackendError, match=r"input 't' must be int64, got int32"):
        pipe.engine("unet")({"x": x[:1], "t": t[:1].astype(np.int32), "y": t[:1]})


def test_engine_paths_outside_the_build_or_of_another_role_are_refused(build_dir):
    # A mistyped engine must not fall back to the build's own UNet.
    with pytest.raises(ManifestError, match=r"unet2\.onnx is not listed in .*manifest\.json"):
        Pipeline.from_manifest(build_dir / "unet2.onnx")
    with pytest.raises(
        ManifestError, match=r"classifier\.onnx is a classifier engine, not the UNet"
    ):
        Pipeline.from_manifest(build_dir / "classifier.onnx")
    with pytest.raises(ManifestError, match=r"unet\.onnx is a unet engine, not a upsampler"):
        Pipeline.from_manifest(build_dir, upsampler=build_dir / "unet.onnx")


def test_gradient_engine_falls_back_to_the_nearest_precision(build_copy):
    """An int8 build whose gradient stayed unquantised uses the fp16 gradient before the fp32."""
    import json
    import shutil

    from runtime.manifest import sha256_of

    path = build_copy / "manifest.json"
    data = json.loads(path.read_text())
    arts = {a["file"]: a for a in data["artifacts"]}
    for src, dst, prec in [("unet.onnx", "unet.int8.onnx", "int8"),
                           ("classifier_grad.onnx", "classifier_grad.fp16.onnx", "fp16")]:  # fmt: skip
        shutil.copy(build_copy / src, build_copy / dst)
        data["artifacts"].append({**arts[src], "file": dst, "precision": prec,
                                  "sha256": sha256_of(build_copy / dst)})  # fmt: skip
    path.write_text(json.dumps(data))
    with Pipeline.from_manifest(build_copy, precision="int8", upsampler=False) as pipe:
        assert pipe.unet_artifact.file == "unet.int8.onnx"
        assert pipe.classifier_artifact.file == "classifier_grad.fp16.onnx"
    with Pipeline.from_manifest(build_copy, precision="fp32", upsampler=False) as pipe:
        assert pipe.classifier_artifact.file == "classifier_grad.onnx"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), r"num_samples must be >= 1, got 0"),
        (dict(labels=[]), r"labels is empty"),
        (dict(labels=[1.0, 2.5]), r"labels must be integer class ids, got float64"),
        (dict(labels=np.array([2.0])), r"a float label is refused rather than truncated"),
        (dict(labels=[1], steps=0), r"steps must be >= 2, got 0"),
        (dict(labels=[1], batch=0), r"batch must be an integer >= 1|batch must be >= 1"),
        (dict(labels=[1], seed=-1), r"seed must be >= 0"),
        (dict(labels=[1], eta=float("nan")), r"eta must be a finite number"),
        (dict(labels=[1], scale=-1.0), r"guidance scale must be >= 0"),
        (dict(labels=[1], upsampler_start_t=5000), r"upsampler start timestep 5000 is past"),
    ],
)
def test_counts_labels_and_ranges_are_checked(pipe, kwargs, match):
    with pytest.raises(SamplingError, match=match):
        pipe.sample(steps=kwargs.pop("steps", "ddim2"), **kwargs)


class _FakeEngine:
    """A Backend with the given inputs that returns zeros and records the labels it was fed."""

    def __init__(self, inputs, out_channels, size):
        from runtime.manifest import TensorSpec

        self.inputs = {
            n: TensorSpec(n, "int64" if n in ("t", "y") else "float32", ()) for n in inputs
        }
        self.outputs = {"out": TensorSpec("out", "float32", ())}
        self.out_channels, self.size, self.labels = out_channels, size, []

    def __call__(self, feeds):
        if "y" in feeds:
            self.labels.append(feeds["y"].copy())
        b = len(feeds["x"])
        return {"out": np.zeros((b, self.out_channels, self.size, self.size), np.float32)}

    def close(self):
        pass


def test_unconditional_base_with_a_class_conditional_upsampler_draws_its_labels(build_dir):
    """The ADM 64->256 upsampler is class-conditional: an unconditional base before it gets
    labels drawn per sample (seed, index), recorded in the result, the same for any batch size."""
    from runtime.manifest import Manifest

    m = Manifest.load(build_dir)
    data = json.loads(json.dumps(m.data))
    data["components"]["unet"]["num_classes"] = None
    del data["components"]["classifier"]
    data["artifacts"] = [a for a in data["artifacts"] if a["role"] in ("unet", "upsampler")]
    m = Manifest(data, build_dir)
    labels = []
    for batch in (3, 1):
        unet = _FakeEngine(["x", "t"], 6, SIZE)
        up = _FakeEngine(["x", "t", "low_res", "y"], 6, 2 * SIZE)
        p = Pipeline(m, (m.artifact("unet"), unet), upsampler=(m.artifact("upsampler"), up))
        res = p.sample(num_samples=3, batch=batch, steps="ddim2", upsampler_steps="ddim2", seed=4)
        assert res.labels is not None and res.labels.shape == (3,)
        assert ((0 <= res.labels) & (res.labels < 10)).all()
        # every upsampler call of the first batch was fed that batch's labels
        assert up.labels[0].tolist() == res.labels[:batch].tolist()
        assert up.labels[-1].tolist() == res.labels[-batch:].tolist()
        labels.append(res.labels.tolist())
    assert labels[0] == labels[1]
