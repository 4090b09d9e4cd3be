"""An ONNX file as a MODEL: converted into the IR's torch.fx GraphModule with onnx2torch.

Files written by PyTorch's exporter feed weights through ``Identity`` and ``Constant``
nodes that onnx2torch cannot convert, so constants are folded first with
onnx-graphsurgeon (``fold_constants().cleanup().toposort()``); the folded model is
what onnx2torch converts. onnx2torch names each layer's module after its ONNX node
(``layer1/layer1.0/conv1/Conv``), which is no attribute name TorchScript or the ONNX
exporter accepts; each module is renamed after its fx node (``layer1_layer1_0_conv1_conv``),
so a layer's node name and module path are the same.

The file's path and declared inputs (name, dims, dtype) are kept in ``gm.meta``;
``check_inputs`` holds ``--input-shape`` to them, as ONNX Runtime holds its feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import fx, nn

from partc.errors import ModelError, first_line

if TYPE_CHECKING:
    from partc.trace import InputSpec

META_ONNX_FILE = "partc.onnx_file"  # the file's path, as the MODEL spec gave it
META_ONNX_INPUTS = "partc.onnx_inputs"  # ((name, dims with None where dynamic, dtype), ...)


def load_onnx(path: Path) -> fx.GraphModule:
    """Convert the ONNX file ``path`` into a GraphModule, in eval mode.

    Raises:
        ModelError: if the file is missing, is not ONNX, or has a node that cannot be
            converted; the message names the file and the node.
    """
    import onnx
    import onnx_graphsurgeon
    from onnx_graphsurgeon.logger import G_LOGGER

    if not path.is_file():
        raise ModelError(f"model {str(path)!r}: file not found")
    try:
        proto = onnx.load(path)
        onnx.checker.check_model(proto)
    except Exception as err:
        raise ModelError(f"model {str(path)!r}: not a valid ONNX file: {first_line(err)}") from None
    try:
        with G_LOGGER.suppress():  # it prints its warnings to stdout; a node it cannot fold is named below
            graph = onnx_graphsurgeon.import_onnx(proto)
            graph.fold_constants().cleanup().toposort()
            folded = onnx_graphsurgeon.export_onnx(graph)
    except Exception as err:
        raise ModelError(f"model {str(path)!r}: folding its constants failed: {first_line(err)}") from err
    gm = _convert(path, folded)
    gm.meta[META_ONNX_FILE] = str(path)
    gm.meta[META_ONNX_INPUTS] = tuple(_declared(value) for value in folded.graph.input)
    return gm.eval()


def _convert(path: Path, proto) -> fx.GraphModule:
    """onnx2torch's GraphModule, with each module renamed after its node."""
    import onnx2torch

    names = [value.name for value in proto.graph.input]
    try:
        converted = onnx2torch.convert(proto, save_input_names=all(n.isidentifier() for n in names))
    except Exception as err:
        raise ModelError(f"model {str(path)!r}: {_failed_node(proto)}cannot be converted to PyTorch "
                         f"(onnx2torch): {first_line(err)}") from err
    root = nn.Module()  # what the graph uses; fx.GraphModule copies the modules and buffers it names
    for node in converted.graph.nodes:
        if node.op == "call_module":
            root.add_module(node.name, converted.get_submodule(node.target))
            node.target = node.name
        elif node.op == "get_attr":  # initializers.onnx_initializer_N: keep their container
            container = node.target.partition(".")[0]
            root.add_module(container, converted.get_submodule(container))
    return fx.GraphModule(root, converted.graph)


def _failed_node(proto) -> str:
    """``node 'NAME' (OpType, opset N): `` for the first node onnx2torch has no converter for, else ""."""
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain: o.version for o in proto.opset_import}
    for node in proto.graph.node:
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(node.domain, 0), domain=node.domain)
        except NotImplementedError:
            return f"node {node.name!r} ({node.op_type}, opset {opsets.get(node.domain, 0)}) "
    return ""


def _declared(value) -> tuple[str, tuple[int | None, ...], str]:
    """An ONNX graph input as (name, dims, dtype): a dim is None where the file leaves it open."""
    import onnx

    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return value.name, dims, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name


def check_inputs(model: nn.Module, inputs: Sequence[InputSpec]) -> None:
    """Check ``inputs`` against the declared inputs of the ONNX file ``model`` came from, if any.

    Raises:
        ModelError: naming the file and the first input whose count, dims or
            dtype differ from the file's, with the ``--input-shape`` the file asks for.
    """
    meta = model.meta if isinstance(model, fx.GraphModule) else {}
    if META_ONNX_INPUTS not in meta:
        return
    declared, source = meta[META_ONNX_INPUTS], meta[META_ONNX_FILE]
    if len(declared) != len(inputs):
        raise ModelError(f"model {source!r}: the file has {len(declared)} input(s) "
                         f"({', '.join(name for name, _, _ in declared)}) but {len(inputs)} --input-shape given")
    for (name, dims, dtype), spec in zip(declared, inputs, strict=True):
        fits = len(dims) == len(spec.shape) and all(d in (None, s) for d, s in zip(dims, spec.shape, strict=True))
        if not fits or dtype != spec.dtype:
            want = ",".join("N" if d is None else str(d) for d in dims) + ("" if dtype == "float32" else f":{dtype}")
            raise ModelError(f"model {source!r}: input {name!r} is declared {want} in the file, but "
                             f"--input-shape gives {spec}; use --input-shape {want}")

