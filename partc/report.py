"""``partc inspect``: a per-layer table of the IR with totals."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

from torch import fx, nn

from partc.ir import META_BYTES, META_FLOPS, META_MACS, META_OP, META_PARAM_BYTES, META_SHAPE, compute_nodes
from partc.trace import InputSpec, load_model, parse_input_spec, trace


@dataclass(frozen=True)
class Layer:
    """One row of the inspection table."""

    name: str
    op: str
    shape: tuple[int, ...] | None
    flops: int
    macs: int
    activation_bytes: int
    param_bytes: int


@dataclass(frozen=True)
class Inspection:
    """Per-layer figures of a traced model and their totals."""

    model: str
    tracer: str
    inputs: tuple[str, ...]
    layers: tuple[Layer, ...]

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def activation_bytes(self) -> int:
        return sum(layer.activation_bytes for layer in self.layers)

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    def to_json(self) -> dict:
        """Return the inspection as a JSON-able dict, totals included."""
        totals = {k: getattr(self, k) for k in ("flops", "macs", "activation_bytes", "param_bytes")}
        return {**asdict(self), "totals": totals}

    def table(self) -> str:
        """Return the inspection as an aligned text table with a totals line."""
        rows = [("name", "op", "output shape", "MFLOPs", "act KB", "params KB")]
        for layer in self.layers:
            shape = "x".join(map(str, layer.shape)) if layer.shape else "-"
            rows.append(
                (layer.name, layer.op, shape, f"{layer.flops / 1e6:.2f}",
                 f"{layer.activation_bytes / 1024:.1f}", f"{layer.param_bytes / 1024:.1f}")
            )
        table = format_table(rows, right=(3, 4, 5))
        totals = (
            f"{len(self.layers)} layers, {self.flops / 1e9:.3f} GFLOPs ({self.macs / 1e9:.3f} GMACs), "
            f"activations {self.activation_bytes / 2**20:.1f} MiB, params {self.param_bytes / 2**20:.1f} MiB "
            f"(traced with {self.tracer})"
        )
        return f"{table}\n{'-' * len(table.splitlines()[1])}\n{totals}"


def format_table(rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """Align ``rows`` into columns, a rule under the first (the header); columns in ``right`` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        .rstrip()
        for r in rows
    ]
    return "\n".join([lines[0], "-" * max(map(len, lines)), *lines[1:]])


def trace_model(model: str | nn.Module, input_shapes: Sequence[str | InputSpec]) -> fx.GraphModule:
    """Load (if ``model`` is a MODEL spec) and trace a model into the annotated IR.

    Raises:
        ModelError: for a bad MODEL spec or input shape.
        TraceError: if the model cannot be traced or rejects the inputs.
    """
    module = load_model(model) if isinstance(model, str) else model
    specs = [s if isinstance(s, InputSpec) else parse_input_spec(s) for s in input_shapes]
    return trace(module, specs)


def inspect(model: str | nn.Module | fx.GraphModule, input_shapes: Sequence[str | InputSpec] = ()) -> Inspection:
    """Python twin of ``partc inspect``: per-layer op, shape, FLOPs, activation and parameter bytes.

    ``model`` is a MODEL spec, an ``nn.Module`` (traced with ``input_shapes``) or an IR
    GraphModule returned by ``trace_model``.

    Raises:
        ModelError, TraceError: as ``trace_model``.
    """
    gm = model if isinstance(model, fx.GraphModule) and "partc.inputs" in model.meta else trace_model(
        model, input_shapes
    )
    layers = tuple(
        Layer(n.name, n.meta[META_OP], n.meta[META_SHAPE], n.meta[META_FLOPS], n.meta[META_MACS],
              n.meta[META_BYTES], n.meta[META_PARAM_BYTES])
        for n in compute_nodes(gm)
    )
    name = model if isinstance(model, str) else type(model).__name__
    return Inspection(name, gm.meta["partc.tracer"], tuple(map(str, gm.meta["partc.inputs"])), layers)
