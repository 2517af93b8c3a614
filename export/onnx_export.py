"""Each ADM component to ONNX: UNet, upsampler, classifier logits and the classifier's input gradient.

The gradient graph cannot go through `torch.onnx.export` directly (autograd.grad does not export),
so `classifier_grad_graph` traces `scale * d/dx sum_b log_softmax(classifier(x, t))[b, y_b]` with
`make_fx(tracing_mode="symbolic")` over the core ATen decompositions, plus our own
decompositions of the two backward ops the table lacks; that traced graph then exports like any
module. Only the input gradient remains: weights are constants, their gradients never traced.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from export.model import EncoderUNetModel, SuperResModel, UNetModel
from runtime.roles import ROLES

OPSET = 18  # the dynamo exporter's minimum; TensorRT 10.0+ parses opsets 9..20
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; stay clear of it

aten = torch.ops.aten


class UNetIO(nn.Module):
    """The UNet with ONNX-facing argument names: x (B,3,H,W), t (B,) int64[, y (B,) int64]."""

    def __init__(self, model: UNetModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None):
        return self.model(x, t, y)


class SuperResIO(nn.Module):
    """x (B,3,H,W), t (B,), low_res (B,3,h,w)[, y (B,)] -> (B, 3 or 6, H, W)."""

    def __init__(self, model: SuperResModel):
        super().__init__()
        self.model = model

    def forward(self, x, t, low_res, y=None):
        return self.model(x, t, low_res, y)


class ClassifierIO(nn.Module):
    """x (B,3,H,W), t (B,) -> logits (B, num_classes)."""

    def __init__(self, model: EncoderUNetModel):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x, t)


def selected_log_prob_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_b log_softmax(logits)[b, y_b], selected with a mask: gather would export as a
    ScatterElements in the backward graph, which breaks fp16."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, K)
    classes = torch.arange(log_probs.shape[1], device=logits.device)
    mask = (y[:, None] == classes[None]).to(log_probs.dtype)  # (B, K) one-hot
    return (log_probs * mask).sum()


def classifier_gradient(classifier: EncoderUNetModel) -> Callable:
    """(x, t, y, scale) -> scale * d log p(y|x_t) / d x_t, through torch.autograd (the reference).

    `scale` is one per sample, (B,) (a scalar broadcasts too): Triton batches only inputs that
    carry the batch dimension, and per-sample scales let requests of different scales share a call.
    """

    def grad(x, t, y, scale):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            total = selected_log_prob_sum(classifier(x, t), y)
            (g,) = torch.autograd.grad(total, x)
        return g * scale.reshape(-1, *([1] * (g.dim() - 1)))  # (B, 1, 1, 1)

    return grad


def _conv_input_grad(
    grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
    output_padding, groups, output_mask,
):  # fmt: skip
    """convolution_backward, input gradient only: a transposed convolution with the same weight."""
    if transposed:
        raise NotImplementedError("backward of a transposed convolution is not needed by ADM")
    grad_input = None
    if output_mask[0]:
        nd = input.dim() - 2
        out_pad = [
            input.shape[2 + i]
            - ((grad_output.shape[2 + i] - 1) * stride[i] - 2 * padding[i]
               + dilation[i] * (weight.shape[2 + i] - 1) + 1)
            for i in range(nd)
        ]  # fmt: skip
        grad_input = aten.convolution(
            grad_output, weight, None, stride, padding, dilation, True, out_pad, groups
        )
    return grad_input, None, None


def _avg_pool2d_input_grad(
    grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
):
    """avg_pool2d backward for ADM's pooling (kernel == stride, no padding): spread evenly."""
    k = list(kernel_size) * (2 // len(kernel_size))
    s = list(stride or kernel_size) * (2 // len(stride or kernel_size))
    if k != s or any(padding) or ceil_mode or divisor_override:
        raise NotImplementedError(
            f"avg_pool2d backward with kernel {k}, stride {s}, padding {padding}"
        )
    up = grad_output.repeat_interleave(k[0], dim=2).repeat_interleave(k[1], dim=3)
    return up / (k[0] * k[1])


def _row_sum(v: torch.Tensor, dim: int) -> torch.Tensor:
    """sum over `dim` (keepdim) as a product with a ones vector. ONNX Runtime's ReduceSum over a
    short last axis (65 attention tokens, 1000 classes) sums in an order set by each row's memory
    alignment, so a sample's gradient would change with its position in a batch, and a server
    that merges requests would not reproduce the in-process images; MatMul sums in a fixed order."""
    moved = v.movedim(dim, -1)  # (..., K)
    ones = torch.ones(moved.shape[-1], 1, dtype=v.dtype, device=v.device)
    return (moved @ ones).movedim(-1, dim)  # (..., 1) back in place


def _softmax_input_grad(grad_output, output, dim, input_dtype):
    """_softmax_backward_data: y * (g - sum(g * y)), the sum in a batch-invariant order."""
    gy = grad_output * output
    return (gy - output * _row_sum(gy, dim)).to(input_dtype)


def _log_softmax_input_grad(grad_output, output, dim, input_dtype):
    """_log_softmax_backward_data: g - exp(y) * sum(g), the sum in a batch-invariant order."""
    return (grad_output - torch.exp(output) * _row_sum(grad_output, dim)).to(input_dtype)


def gradient_decompositions() -> dict:
    from torch._decomp import core_aten_decompositions

    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_input_grad
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_input_grad
    table[aten._softmax_backward_data.default] = _softmax_input_grad
    table[aten._log_softmax_backward_data.default] = _log_softmax_input_grad
    return table


class _GraphIO(nn.Module):
    def __init__(self, gm: nn.Module):
        super().__init__()
        self.gm = gm

    def forward(self, x, t, y, scale):
        return self.gm(x, t, y, scale)


def classifier_grad_graph(classifier: EncoderUNetModel, batch: int = 2) -> nn.Module:
    """Trace the classifier's input-gradient function to an autograd-free module.

    The example batch must be at least 2: a batch of 1 would be specialised into the graph.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    classifier = classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    size, dtype = classifier.image_size, torch.float32
    b = max(batch, 2)
    x = torch.randn(b, classifier.in_channels, size, size, dtype=dtype)
    t = torch.arange(b, dtype=torch.int64)
    y = torch.arange(b, dtype=torch.int64) % classifier.out_channels
    scale = torch.ones(b)
    gm = make_fx(
        classifier_gradient(classifier),
        tracing_mode="symbolic",
        decomposition_table=gradient_decompositions(),
        _allow_non_fake_inputs=True,
    )(x, t, y, scale)
    return _GraphIO(gm)


def example_inputs(role: str, model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    """Named example inputs of a role's graph, in the order of `runtime.roles` (the graph's)."""
    size = model.image_size
    b = max(batch, 2)
    gen = torch.Generator().manual_seed(0)
    n_classes = model.out_channels if ROLES[role].component == "classifier" else model.num_classes
    feeds: dict[str, torch.Tensor] = {}
    for spec in ROLES[role].inputs:
        if spec.optional and n_classes is None:
            continue
        if spec.name == "x":
            feeds["x"] = torch.randn(b, 3, size, size, generator=gen)
        elif spec.name == "t":
            feeds["t"] = torch.arange(b, dtype=torch.int64) * 7
        elif spec.name == "low_res":
            small = model.spec.low_res_size
            feeds["low_res"] = torch.randn(b, 3, small, small, generator=gen)
        elif spec.name == "y":
            feeds["y"] = torch.arange(b, dtype=torch.int64) % n_classes
        elif spec.name == "scale":
            feeds["scale"] = torch.ones(b)
        else:
            raise ValueError(f"no example input for {role} input {spec.name!r}")
    return feeds


def export_onnx(
    role: str,
    model: nn.Module,
    path: str | Path,
    *,
    batch_max: int = 64,
    opset: int = OPSET,
) -> list[str]:
    """Export one role's graph to `path`: unet, upsampler, classifier (logits) or
    classifier_grad (`runtime.roles`), its inputs and output named as the table says.

    Batch is dynamic (named "batch"), 1..batch_max. Returns the files written (the graph, plus its
    external-data file for models over ~1.8 GB).
    """
    path = Path(path)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    feeds = example_inputs(role, model, 2)
    module = {
        "unet": UNetIO,
        "upsampler": SuperResIO,
        "classifier": ClassifierIO,
        "classifier_grad": classifier_grad_graph,
    }[role](model)
    output = ROLES[role].output
    batch = torch.export.Dim("batch", min=1, max=batch_max)
    dynamic = {name: {0: batch} for name in feeds}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    with _quiet():
        torch.onnx.export(
            module,
            tuple(feeds.values()),
            str(path),
            input_names=list(feeds),
            output_names=[output],
            dynamic_shapes=dynamic,
            dynamo=True,
            opset_version=opset,
            external_data=external,
            optimize=True,
            verbose=False,
        )
    if not external:
        fold_constants(path)
    written = [path.name]
    data = path.with_name(path.name + ".data")
    if data.exists():
        written.append(data.name)
    return written


def fold_constants(path: Path) -> None:
    """Fold what the exporter left foldable (shape arithmetic, constant products) with onnxslim:
    about a fifth fewer nodes on ADM graphs, outputs unchanged. Graphs with external data are
    left as exported."""
    try:
        import onnx
        import onnxslim
    except ImportError:
        return
    with _quiet():
        slim = onnxslim.slim(onnx.load(str(path)))
    onnx.save(slim, str(path))


class _quiet:
    """Silence the exporter's progress lines and warnings; errors still raise."""

    def __enter__(self):
        self._level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.simplefilter("ignore")
        self._devnull = open(os.devnull, "w")  # noqa: SIM115
        import contextlib

        self._redirect = contextlib.redirect_stdout(self._devnull)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        self._redirect.__exit__(*exc)
        self._devnull.close()
        self._warn.__exit__(*exc)
        logging.getLogger("torch").setLevel(self._level)
        return False
