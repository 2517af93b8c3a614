"""A real tritonserver (nvidia-pytriton's, on 127.0.0.1) serving `gdexport triton`'s repository of
the session build through examples/triton_cpu.py: concurrent requests give the in-process runtime's
images, bit for bit; the engines' dynamic batchers merge the step calls of concurrent requests; bad
requests get clear errors while the server keeps serving; a killed server gives the client a clear
error. About two minutes on two CPU cores.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from export.triton import make_repository
from runtime.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from triton_client import ClientError, load_test, request_samples  # noqa: E402
from triton_cpu import TritonServer  # noqa: E402

pytestmark = pytest.mark.triton

REQUESTS = [  # (labels, scale, steps, seed, first_index)
    ([1, 2], 2.0, 4, 0, 0),
    ([7], 0.0, 4, 3, 0),
    ([0, 9, 4], 4.0, 3, 5, 2),
    ([6], 1.5, 4, 11, 0),
]


@pytest.fixture(scope="module")
def server(build_dir, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "repo"
    make_repository(build_dir, repo, sampler_instances=4, max_samples=8, queue_delay_us=20000)
    with TritonServer(repo) as s:
        yield s


def test_concurrent_requests_match_the_in_process_runtime(server, build_dir):
    results: dict[int, object] = {}

    def send(i):
        labels, scale, steps, seed, first = REQUESTS[i]
        try:
            results[i] = request_samples(
                server.url, labels, scale=scale, steps=steps, seed=seed, first_index=first
            )
        except ClientError as e:
            results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with Pipeline.from_manifest(build_dir, backend="onnxruntime") as pipe:
        for i, (labels, scale, steps, seed, first) in enumerate(REQUESTS):
            got = results[i]
            assert not isinstance(got, ClientError), got
            want = pipe.sample(
                labels, scale=scale, steps=f"ddim{steps}", seed=seed, first_index=first
            )
            assert got.images.shape == want.images.shape == (len(labels), 32, 32, 3)
            np.testing.assert_array_equal(got.images, want.images)
            np.testing.assert_array_equal(got.labels, labels)
    # Every sample-step reached the UNet; concurrent requests shared executions.
    inferences, executions = server.executions("gd_unet")
    base_steps = sum(len(r[0]) * r[2] for r in REQUESTS)
    assert inferences >= base_steps
    unmerged = sum(r[2] for r in REQUESTS)  # one UNet execution per step of each request
    assert executions < unmerged, (inferences, executions, unmerged)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"labels": [3, 12]}, "class 12 is out of range"),
        ({"labels": [1], "steps": -4}, "steps must be a positive number"),
        ({"labels": list(range(9))}, "9 samples requested; one request takes 1..8"),
        ({"labels": [1], "scale": float("nan")}, "scale must be a finite number"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, kwargs, message):
    with pytest.raises(ClientError, match="HTTP 400") as e:
        request_samples(server.url, **({"steps": 2} | kwargs))
    assert message in str(e.value)
    assert request_samples(server.url, [2], steps=2).images.shape == (1, 32, 32, 3)


def test_load_test_reports_every_request(server):
    r = load_test(server.url, clients=3, requests=6, labels_per_request=[1, 2], steps=2)
    assert r["requests"] == 6 and r["errors"] == 0 and r["requests_per_s"] > 0


def test_killing_the_server_mid_request_gives_a_clear_error(build_dir, tmp_path):
    repo = tmp_path / "repo"
    make_repository(build_dir, repo, sampler_instances=1)
    with TritonServer(repo) as s:
        url = s.url
        caught: list[BaseException] = []

        def send():
            try:
                request_samples(url, [1] * 8, steps=1000, scale=1.0)
            except BaseException as e:  # noqa: BLE001
                caught.append(e)

        t = threading.Thread(target=send)
        t.start()
        time.sleep(3)  # the request is inside its 1000-step loop
        assert t.is_alive()
        s.kill()
        t.join(timeout=60)
    assert not t.is_alive()
    assert len(caught) == 1 and isinstance(caught[0], ClientError), caught
    assert "closed the connection" in str(caught[0]) or "cannot reach" in str(caught[0])
    with pytest.raises(ClientError, match="cannot reach a Triton server"):
        request_samples(url, [1], steps=2, timeout=5)
