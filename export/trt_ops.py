"""Check an ONNX graph against what the TensorRT ONNX parser takes (TensorRT 10.x and 11.x).

The op list and restrictions follow onnx-tensorrt's `docs/operators.md` (opsets 9..20 for 10.0+):
only operators marked supported there, plus the restrictions that ADM graphs could run into.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

MAX_OPSET = 20

SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GroupNormalization GRU HardSigmoid HardSwish Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mish Mod Mul Neg NonZero Not
    OneHot Or Pad PRelu Pow QuantizeLinear RandomUniform RandomUniformLike Range Reciprocal
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize RNN Round Scan ScatterElements ScatterND Selu
    Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split
    Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
    """.split()
)
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}


@dataclass(frozen=True)
class OpProblem:
    node: str
    op_type: str
    why: str

    def __str__(self) -> str:
        return f"{self.op_type} node {self.node!r}: {self.why}"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer}
    names |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    # A weight behind DequantizeLinear of an initializer counts as constant (Q/DQ graphs).
    names |= {
        n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in names
    }
    return names


def check_tensorrt_ops(model: onnx.ModelProto) -> list[OpProblem]:
    """Every op and attribute TensorRT would refuse; an empty list means the graph is parseable."""
    problems: list[OpProblem] = []
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version > MAX_OPSET:
            problems.append(OpProblem("(model)", "opset", f"opset {imp.version} > {MAX_OPSET}"))
        elif imp.domain not in ("", "ai.onnx", "pkg.onnxscript.torch_lib.common"):
            problems.append(OpProblem("(model)", "opset", f"custom domain {imp.domain!r}"))
    graph = model.graph
    consts = _constant_names(graph)
    for node in graph.node:
        name = node.name or (node.output[0] if node.output else "?")
        if node.domain not in ("", "ai.onnx"):
            problems.append(OpProblem(name, node.op_type, f"custom-domain op ({node.domain})"))
            continue
        if node.op_type not in SUPPORTED_OPS:
            problems.append(OpProblem(name, node.op_type, "not supported by the TensorRT parser"))
            continue
        if node.op_type in ("Conv", "ConvTranspose") and node.input[1] not in consts:
            problems.append(OpProblem(name, node.op_type, "weights must be an initializer"))
        if node.op_type == "InstanceNormalization" and not set(node.input[1:3]) <= consts:
            problems.append(OpProblem(name, node.op_type, "scale and bias must be initializers"))
        if node.op_type == "Resize":
            mode = _attr(node, "mode", "nearest")
            coord = _attr(node, "coordinate_transformation_mode", "half_pixel")
            if mode not in RESIZE_MODES or coord not in RESIZE_COORDS:
                problems.append(OpProblem(name, node.op_type, f"mode {mode} / {coord} unsupported"))
        if node.op_type == "Einsum" and "..." in _attr(node, "equation", ""):
            problems.append(OpProblem(name, node.op_type, "ellipsis in the equation"))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2:
            zp = next((i for i in graph.initializer if i.name == node.input[2]), None)
            if zp is not None and any(onnx.numpy_helper.to_array(zp).ravel()):
                problems.append(OpProblem(name, node.op_type, "zero point must be 0"))
    return problems
