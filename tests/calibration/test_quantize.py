"""The int8 Q/DQ graphs: what TensorRT's explicit quantisation needs, and what stays in float.

The properties are read off the graphs here, independently of `calibration.quantize`: the layers
that must stay in float are found by the module names the exporter leaves on the UNet's weights,
not by the data-flow rules the quantiser uses.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calibration.dataset import CalibrationSet
from calibration.quantize import DEFAULT_KEEP, sensitive_nodes
from export.trt_ops import check_tensorrt_ops

GRAPHS = ["unet.int8.onnx", "upsampler.int8.onnx"]
# Weight-name fragments of the layers kept in float by default (see calibration/quantize.py).
FLOAT_WEIGHTS = ("input_blocks.0.0.", "model.out.2.", "time_embed", "label_emb", "emb_layers",
                 "skip_connection")  # fmt: skip


def _load(build: Path, file: str) -> onnx.ModelProto:
    return onnx.load(str(build / file))


class Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {i.name: i for i in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.outputs = {o.name for o in g.output}

    def produced_by(self, tensor: str, op: str) -> bool:
        p = self.producer.get(tensor)
        return p is not None and p.op_type == op

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@pytest.mark.parametrize("file", [*GRAPHS, "classifier_grad.int8.onnx"])
def test_qdq_graph_is_what_tensorrt_needs(int8_build, file):
    build, _ = int8_build
    if not (build / file).exists():
        pytest.skip(f"{file} was not kept (the gradient's int8 accuracy did not hold)")
    model = _load(build, file)
    g = Graph(model)
    qdq = [n for n in g.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "no Q/DQ nodes: nothing was quantised"
    for n in qdq:
        # symmetric: an explicit int8 zero point of 0 everywhere (TensorRT takes no other)
        assert len(n.input) == 3, n.name
        zp = g.inits[n.input[2]]
        assert zp.data_type == TensorProto.INT8, n.name
        assert not g.array(n.input[2]).any(), f"{n.name}: nonzero zero point"
        # dedicated pairs: each Q feeds one DQ; a DQ feeding a quantised op feeds only that op
        # (the DQ after a quantised Conv's output may feed several float ops: GroupNorm's Reshape
        # and Shape)
        outs = g.consumers[n.output[0]]
        if n.op_type == "QuantizeLinear":
            assert [o.op_type for o in outs] == ["DequantizeLinear"], n.name
        elif any(o.op_type in ("Conv", "Gemm", "MatMul") for o in outs):
            assert len(outs) == 1, f"{n.name} feeds {len(outs)} nodes, one a quantised op"
    # no int32 bias, no int32 anything
    assert not [i.name for i in g.inits.values() if i.data_type == TensorProto.INT32]
    quantized = 0
    for n in g.nodes:
        if n.op_type not in ("Conv", "Gemm") or not g.produced_by(n.input[0], "DequantizeLinear"):
            continue
        quantized += 1
        dq = g.producer[n.input[1]]
        assert dq.op_type == "DequantizeLinear", f"{n.name}: activation quantised, weight not"
        w, scale = g.array(dq.input[0]), g.array(dq.input[1])
        assert w.dtype == np.int8 and w.ndim >= 2
        assert _attr(dq, "axis", 1) == 0 and scale.shape == (w.shape[0],), (
            f"{n.name}: not per-channel"
        )
        assert np.abs(w).max() <= 127
        if len(n.input) > 2 and n.input[2]:
            assert n.input[2] in g.inits and g.inits[n.input[2]].data_type == TensorProto.FLOAT
    assert quantized >= 5
    assert check_tensorrt_ops(model) == []


@pytest.mark.parametrize("file", GRAPHS)
def test_weights_dequantize_to_the_fp32_weights(int8_build, file):
    build, _ = int8_build
    q, ref = Graph(_load(build, file)), Graph(_load(build, file.replace(".int8", "")))
    # The build picks the range from its CPU (7 bits without VNNI / AMX-INT8, see
    # test_cpu_choices.py): ONNX Runtime maps [-max|w_c|, max|w_c|] onto [-64, 64] or [-127, 127].
    seven = json.loads((build / "manifest.json").read_text())["int8"]["weight_range"] == "7-bit"
    levels = 64 if seven else 127
    checked = 0
    for n in q.nodes:
        if n.op_type != "DequantizeLinear" or n.input[0] not in q.inits:
            continue
        w, scale = q.array(n.input[0]).astype(np.float64), q.array(n.input[1])
        name = n.input[0].removesuffix("_quantized")
        want = ref.array(name).astype(np.float64)
        got = w * scale.reshape(-1, *[1] * (w.ndim - 1))
        # symmetric per-channel: scale = max|w_c| / levels; error at most half a step
        np.testing.assert_allclose(
            scale, np.abs(want).reshape(len(want), -1).max(1) / levels, rtol=1e-5
        )
        assert np.abs(w).max() <= levels
        assert (np.abs(got - want) <= scale.reshape(-1, *[1] * (w.ndim - 1)) / 2 + 1e-7).all()
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("file", GRAPHS)
def test_sensitive_layers_stay_float(int8_build, file):
    build, _ = int8_build
    g = Graph(_load(build, file))
    kept = quantized = 0
    for n in g.nodes:
        if n.op_type in ("Einsum", "Softmax"):
            assert not any(g.produced_by(i, "DequantizeLinear") for i in n.input), n.name
        if n.op_type not in ("Conv", "Gemm", "Gather"):
            continue
        weight = next(
            (i for i in n.input if i.startswith("model.") or i.endswith("_quantized")), ""
        )
        is_q = any(g.produced_by(i, "DequantizeLinear") for i in n.input)
        if any(f in weight for f in FLOAT_WEIGHTS):
            assert not is_q, f"{n.name} ({weight}) must stay in float"
            assert weight in g.inits and g.inits[weight].data_type == TensorProto.FLOAT
            kept += 1
        elif n.op_type == "Conv":
            assert is_q, f"{n.name} ({weight}) should be quantised"
            quantized += 1
    assert kept >= 5 and quantized >= 5
    # the output head: the node producing the graph output reads a float convolution
    out_conv = g.producer[next(iter(g.outputs))]
    assert out_conv.op_type == "Conv" and out_conv.input[1].startswith("model.out.2.")


def test_keep_patterns_and_categories(build_dir):
    model = onnx.load(str(build_dir / "unet.onnx"))
    inits = {i.name for i in model.graph.initializer}
    weights = {n.name: next((i for i in n.input if i in inits), "") for n in model.graph.node}
    default = sensitive_nodes(model, DEFAULT_KEEP)
    # the data-flow rules find what the module names say
    by_name = {
        n for n, w in weights.items() if any(f in w for f in FLOAT_WEIGHTS) and w.endswith("weight")
    }
    assert {n for n in default if weights[n].endswith("weight")} == by_name
    assert sensitive_nodes(model, ["skip"]).keys() == {
        n for n, w in weights.items() if "skip_connection.weight" in w
    }
    middle = sensitive_nodes(model, ["*middle_block*"])
    assert middle and all("middle_block" in weights[n] for n in middle)
    assert sensitive_nodes(model, []) == {}


def test_int8_unet_close_to_fp32_but_not_equal(int8_build, calib_build):
    """Relative RMS error of the int8 UNet against fp32 on recorded trajectory inputs."""
    import onnxruntime as ort

    build, _ = int8_build
    cal = CalibrationSet.load(calib_build)  # other trajectories than the int8 build calibrated on
    sessions = {
        p: ort.InferenceSession(str(build / f), providers=["CPUExecutionProvider"])
        for p, f in (("fp32", "unet.onnx"), ("int8", "unet.int8.onnx"))
    }
    err2 = ref2 = 0.0
    for feeds in cal.feeds("unet"):
        want = sessions["fp32"].run(None, feeds)[0].astype(np.float64)
        got = sessions["int8"].run(None, feeds)[0].astype(np.float64)
        err2 += ((got - want) ** 2).sum()
        ref2 += (want**2).sum()
    rel = np.sqrt(err2 / ref2)
    assert 1e-3 < rel < 0.2, rel


def test_onnxruntime_int8_graphs_record_their_weight_range(int8_build):
    from runtime import cpu

    build, _ = int8_build
    data = json.loads((build / "manifest.json").read_text())
    arts = [
        a for a in data["artifacts"] if a["precision"] == "int8" and a["backend"] == "onnxruntime"
    ]
    seven = cpu.int8_dot_product() is None  # 16-bit accumulators: 7-bit weights
    assert arts and all(a["quantization"]["reduce_range"] is seven for a in arts)
    assert data["int8"]["weight_range"] == ("7-bit" if seven else "8-bit")
