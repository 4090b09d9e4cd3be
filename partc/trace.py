"""From a MODEL spec and input shapes to the IR: load, trace, annotate.

MODEL is ``torchvision:NAME``, ``package.module:factory`` or ``path/to/file.py:factory``
(a callable taking no arguments and returning an ``nn.Module``). Models are built under a
fixed seed with random weights (``weights=None``) and put in eval mode. A MODEL ending in
``.onnx`` is an ONNX file, converted with its own weights (``partc.onnx_input``).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import io
import logging
import math
import operator
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from partc.errors import ModelError, TraceError, first_line
from partc.ir import (
    META_BYTES,
    META_DTYPE,
    META_FLOPS,
    META_KIND,
    META_MACS,
    META_OP,
    META_PARAM_BYTES,
    META_SHAPE,
)

log = logging.getLogger(__name__)

SEED = 0

# torchvision models whose defaults add training-only heads or slow initialisation.
_TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
MAX_INPUT_BYTES = 2**62  # torch counts sizes in int64: a larger input overflows before it fails to allocate


@dataclass(frozen=True)
class InputSpec:
    """One model input: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __str__(self) -> str:
        dims = ",".join(map(str, self.shape))
        return dims if self.dtype == "float32" else f"{dims}:{self.dtype}"

    def example(self) -> torch.Tensor:
        """Return a seeded example tensor of this shape and dtype.

        Raises:
            ModelError: if this host cannot allocate it.
        """
        size = math.prod(self.shape) * _DTYPES[self.dtype].itemsize
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        gen = torch.Generator().manual_seed(SEED)
        try:
            if size > memory:  # filling it would bring the out-of-memory killer, not an error
                raise MemoryError
            if self.dtype.startswith("int"):
                return torch.randint(0, 2, self.shape, generator=gen, dtype=_DTYPES[self.dtype])
            return torch.randn(self.shape, generator=gen).to(_DTYPES[self.dtype])
        except (RuntimeError, MemoryError):
            raise ModelError(f"--input-shape {self}: an example input of {size / 2**30:.3g} GiB does not fit in this "
                             f"host's memory ({memory / 2**30:.3g} GiB); use a smaller shape") from None


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``1,3,224,224`` or ``1,128:int64`` into an ``InputSpec``.

    Raises:
        ModelError: if the text is not a comma-separated list of positive integers,
            optionally followed by ``:DTYPE``.
    """
    dims, _, dtype = text.strip().partition(":")
    dtype = dtype or "float32"
    if dtype not in _DTYPES:
        raise ModelError(f"--input-shape {text!r}: unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise ModelError(
            f"--input-shape {text!r}: expected comma-separated integers such as 1,3,224,224"
        ) from None
    if any(d <= 0 for d in shape):
        raise ModelError(f"--input-shape {text!r}: every dimension must be positive")
    if math.prod(shape) * _DTYPES[dtype].itemsize > MAX_INPUT_BYTES:
        raise ModelError(f"--input-shape {text!r}: {math.prod(shape)} elements are more than a tensor can hold "
                         f"(at most {MAX_INPUT_BYTES} bytes); use a smaller shape")
    return InputSpec(shape, dtype)


def load_model(spec: str) -> nn.Module:
    """Build the model that ``spec`` names, seeded, in eval mode.

    Raises:
        ModelError: if the spec names nothing loadable, the factory raises, it does not
            return an ``nn.Module``, or an ONNX file does not convert.
    """
    if spec.endswith(".onnx"):
        from partc.onnx_input import load_onnx

        return load_onnx(Path(spec))
    source, sep, name = spec.rpartition(":")
    if not sep or not source or not name:
        raise ModelError(
            f"model {spec!r}: expected torchvision:NAME, package.module:factory, path/to/file.py:factory "
            "or path/to/model.onnx"
        )
    if source == "torchvision":
        factory = _torchvision_factory(name)
    elif source.endswith(".py") or Path(source).exists():
        factory = _file_factory(spec, Path(source), name)
    else:
        factory = _module_factory(spec, source, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        try:
            model = factory()
        except SystemExit as err:
            raise ModelError(f"model {spec!r}: factory called sys.exit({err.code!r}) instead of returning a "
                             "torch.nn.Module") from None
        except Exception as err:
            raise ModelError(f"model {spec!r}: factory raised {type(err).__name__}: {first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {spec!r}: factory returned {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _torchvision_factory(name: str):
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelError(f"model 'torchvision:{name}': unknown torchvision model{hint}")
    kwargs = _TORCHVISION_KWARGS.get(name, {})
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


def _file_factory(spec: str, path: Path, name: str):
    if not path.is_file():
        raise ModelError(f"model {spec!r}: file {str(path)!r} not found")
    module_name = f"partc_model_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        del sys.modules[module_name]
        raise ModelError(f"model {spec!r}: importing {path} raised {type(err).__name__}: {first_line(err)}") from err
    return _factory_attr(spec, module, name)


def _module_factory(spec: str, source: str, name: str):
    try:
        module = importlib.import_module(source)
    except ImportError as err:
        raise ModelError(f"model {spec!r}: cannot import module {source!r}: {first_line(err)}") from err
    return _factory_attr(spec, module, name)


def _factory_attr(spec: str, module, name: str):
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelError(f"model {spec!r}: {module.__name__!r} has no callable {name!r}")
    return factory


def trace(model: nn.Module, inputs: Sequence[InputSpec]) -> fx.GraphModule:
    """Trace ``model`` into the IR and annotate every node.

    torch.fx symbolic tracing comes first; where it fails (data-dependent Python control
    flow), torch.export is tried. Shapes are then propagated with example inputs and every
    node gets ``META_OP`` .. ``META_PARAM_BYTES``.

    Raises:
        TraceError: if neither tracer handles the model, or a layer rejects the inputs.
        ModelError: if a model converted from an ONNX file is given other inputs than the
            file declares.
    """
    from partc.onnx_input import check_inputs  # here: it imports this module

    check_inputs(model, inputs)
    examples = [spec.example() for spec in inputs]
    try:
        gm = fx.symbolic_trace(model)
        tracer = "torch.fx"
    except Exception as fx_err:
        log.info("torch.fx could not trace the model (%s); trying torch.export", first_line(fx_err))
        printed = io.StringIO()  # torch.export prints partial graphs to stderr when it fails
        try:
            with contextlib.redirect_stderr(printed):
                gm = torch.export.export(model, tuple(examples)).module()
        except Exception as export_err:
            log.debug("torch.export output:\n%s", printed.getvalue())
            raise TraceError(
                f"{type(model).__name__} cannot be traced: torch.fx: {first_line(fx_err)}; "
                f"torch.export: {first_line(export_err)}"
            ) from export_err
        tracer = "torch.export"
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(examples):
        raise TraceError(
            f"{type(model).__name__} takes {len(placeholders)} input(s) "
            f"({', '.join(n.name for n in placeholders)}) but {len(examples)} --input-shape given"
        )
    gm.meta["partc.tracer"] = tracer
    gm.meta["partc.inputs"] = tuple(inputs)
    annotate(gm)
    return gm


def annotate(gm: fx.GraphModule) -> None:
    """(Re)compute ``META_OP`` .. ``META_PARAM_BYTES`` of every node of ``gm``.

    Runs ``gm`` once on the seeded example inputs that ``trace`` recorded, so a pass that
    adds nodes can annotate them the way tracing does.

    Raises:
        TraceError: if ``gm`` was not made by ``trace`` (no recorded inputs), or a layer
            rejects its input.
    """
    inputs = gm.meta.get("partc.inputs")
    if inputs is None:
        raise TraceError("the GraphModule has no recorded example inputs; build it with partc.trace.trace")
    with torch.no_grad():
        _Annotator(gm).run(*[spec.example() for spec in inputs])


class _Annotator(fx.Interpreter):
    """Runs the graph once on example inputs, recording shapes, bytes, FLOPs and params."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our TraceError already names the node

    def run_node(self, n: fx.Node):
        counter = FlopCounterMode(display=False)
        try:
            with counter:
                result = super().run_node(n)
        except Exception as err:
            raise TraceError(
                f"layer {n.name!r} ({_op_name(n, self.module)}) rejects its input: {first_line(err)}; "
                "check --input-shape"
            ) from err
        op = _op_name(n, self.module)
        tensors = _tensors(result)
        n.meta[META_OP] = op
        n.meta[META_KIND] = _kind(n.op, op) if tensors or n.op == "output" else "data"
        single = isinstance(result, torch.Tensor)
        n.meta[META_SHAPE] = tuple(result.shape) if single else None
        n.meta[META_DTYPE] = str(result.dtype).removeprefix("torch.") if single else None
        n.meta[META_BYTES] = sum(t.numel() * t.element_size() for t in tensors)
        macs = counter.get_total_flops() // 2
        if op == "multiheadattention" and not macs:  # its fused eval fast path is invisible to the counter
            macs = _attention_macs(n, self.module.get_submodule(n.target).batch_first)
        n.meta[META_MACS] = macs
        n.meta[META_FLOPS] = 2 * macs if macs else _elementwise_flops(n, n.meta[META_KIND], result, self.module)
        n.meta[META_PARAM_BYTES] = _param_bytes(n, self.module)
        return result


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _op_name(n: fx.Node, gm: fx.GraphModule) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__.lower()
    if n.op == "call_function":
        if isinstance(n.target, torch._ops.OpOverload):
            return n.target._schema.name.split("::")[-1].rstrip("_")
        name = getattr(n.target, "__name__", str(n.target)).strip("_")
        return _INPLACE_OPERATORS.get(name, name)
    if n.op == "call_method":
        return n.target.rstrip("_")
    return n.op


_INPLACE_OPERATORS = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv"}

# Operator name -> cost class. Names are module classes lower-cased, function names or
# ATen op names (in-place trailing '_' removed).
_KINDS = {
    "conv": "conv1d conv2d conv3d convtranspose1d convtranspose2d convtranspose3d convolution",
    "matmul": "linear addmm mm bmm matmul multiheadattention scaled_dot_product_attention baddbmm einsum",
    "pool": "maxpool1d maxpool2d maxpool3d avgpool1d avgpool2d avgpool3d adaptiveavgpool1d adaptiveavgpool2d "
    "adaptivemaxpool2d max_pool2d avg_pool2d adaptive_avg_pool2d max_pool2d_with_indices mean",
    "norm": "batchnorm1d batchnorm2d batchnorm3d layernorm groupnorm localresponsenorm instancenorm2d "
    "batch_norm layer_norm group_norm _native_batch_norm_legit_no_training native_layer_norm layernorm2d",
    "elementwise": "relu relu6 hardswish hardsigmoid hardtanh silu gelu sigmoid tanh softmax stochasticdepth "
    "add sub mul truediv div neg exp sqrt rsqrt pow clamp dropout_ abs",
    "data": "flatten view reshape permute transpose contiguous size getitem getattr cat concat chunk split pad "
    "unsqueeze squeeze expand identity flatten dropout t clone stack unbind narrow slice select "
    "expand_as to type_as _assert_tensor_metadata alias",
}
_KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names.split()}


def _kind(fx_op: str, op: str) -> str:
    if fx_op == "placeholder":
        return "input"
    if fx_op == "output":
        return "output"
    if fx_op == "get_attr":
        return "data"
    return _KIND_OF.get(op, "other")


def _elementwise_flops(n: fx.Node, kind: str, result, gm: fx.GraphModule) -> int:
    """FLOPs of a node without multiply-accumulates: one per output element, pools per window."""
    if kind in ("input", "output", "data"):
        return 0
    numel = sum(t.numel() for t in _tensors(result))
    if kind == "pool":
        if n.op == "call_module":
            kernel = getattr(gm.get_submodule(n.target), "kernel_size", None)
            if kernel is not None:
                return numel * math.prod(kernel if isinstance(kernel, (tuple, list)) else (kernel, kernel))
        inputs = [a for a in n.all_input_nodes if META_BYTES in a.meta]
        return max((_numel(a) for a in inputs), default=numel)
    if kind == "norm":
        return 2 * numel
    return numel


def _attention_macs(n: fx.Node, batch_first: bool) -> int:
    """Multiply-accumulates of nn.MultiheadAttention: q/k/v and output projections plus attention."""
    query, key = (a.meta[META_SHAPE] for a in n.args[:2])
    embed = query[-1]
    tokens_q = math.prod(query[:-1])
    tokens_kv = math.prod(key[:-1])
    batch = 1 if len(query) == 2 else query[0] if batch_first else query[1]
    per_batch_q, per_batch_kv = tokens_q // batch, tokens_kv // batch
    projections = (2 * tokens_q + 2 * tokens_kv) * embed * embed
    attention = 2 * batch * per_batch_q * per_batch_kv * embed
    return projections + attention


def _numel(node: fx.Node) -> int:
    shape = node.meta.get(META_SHAPE)
    return math.prod(shape) if shape else 0


def _param_bytes(n: fx.Node, gm: fx.GraphModule) -> int:
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        tensors = [*mod.parameters(), *mod.buffers()]
    elif n.op == "get_attr":
        tensors = [operator.attrgetter(n.target)(gm)]
    else:
        return 0
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
