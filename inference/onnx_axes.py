"""Rewiring an ONNX network's axes: a MONAI-trained network made to take Portico's (N, C, z, y, x).

Portico runs a network on patches of the series as stored, (slice, row, column). A MONAI network was
trained on what ``LoadImage`` gives, (column, row, slice), possibly reoriented by ``Orientation``;
:func:`wrap_axes` puts transposes (and flips, for ``axcodes``) around its graph so that it takes
Portico's order while the network still sees its own. Nothing in the graph is executed here.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from inference.errors import PackageError

#: Portico's axes (z, y, x) and where each points for a standard axial series
PORTICO_DIRECTIONS = ("S", "P", "L")
OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
_INT64_MIN = -(2**63)


def axis_map(axcodes: str) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """For each axis of a MONAI-trained network, the Portico axis it reads; and the network axes to flip.

    ``axcodes`` is the bundle's ``Orientation`` (e.g. ``"RAS"``); empty means ``LoadImage``'s order.
    """
    if not axcodes:
        return (2, 1, 0), ()  # LoadImage order: column, row, slice
    codes = axcodes.upper()
    if len(codes) != 3 or any(c not in OPPOSITE for c in codes):
        raise PackageError(f"axcodes {axcodes!r} are not three of L/R, A/P, S/I")
    axes: list[int] = []
    flips: list[int] = []
    for net_axis, c in enumerate(codes):
        portico = next(i for i, d in enumerate(PORTICO_DIRECTIONS) if c in (d, OPPOSITE[d]))
        if portico in axes:
            raise PackageError(f"axcodes {axcodes!r} name one anatomical axis twice")
        axes.append(portico)
        if c != PORTICO_DIRECTIONS[portico]:
            flips.append(net_axis)
    return (axes[0], axes[1], axes[2]), tuple(flips)


def to_portico(net: tuple[float, float, float] | tuple[int, int, int] | None,
                axes: tuple[int, int, int]) -> Any:
    """Reorder a per-network-axis triple into Portico's (z, y, x)."""
    if net is None:
        return None
    out = [net[0], net[1], net[2]]
    for net_axis, portico_axis in enumerate(axes):
        out[portico_axis] = net[net_axis]
    return tuple(out)


def write_model(src: Path, dest: Path, axes: tuple[int, int, int], flips: tuple[int, ...]) -> str:
    """Copy (``portico`` layout) or wrap (``monai``) the ONNX model; returns the source's sha256."""
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    if axes == (0, 1, 2) and not flips:
        shutil.copyfile(src, dest)
        return digest
    wrap_axes(src, dest, axes, flips)
    return digest


def wrap_axes(src: Path, dest: Path, axes: tuple[int, int, int], flips: tuple[int, ...]) -> None:
    """Write ``src`` with its first input and output taking/giving Portico's (N, C, z, y, x).

    Network axis ``a`` reads Portico axis ``axes[a]``; ``flips`` are network axes reversed. The
    graph is only rewired (Transpose, Slice); nothing in it is executed here.
    """
    try:
        import onnx  # the [train] extra; needed only to import bundles
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise PackageError("importing a MONAI bundle with layout 'monai' needs the onnx package "
                           "(pip install onnx)") from exc
    import numpy as np

    try:
        model = onnx.load(str(src))
    except Exception as exc:  # protobuf raises its own DecodeError types
        raise PackageError(f"{src}: not a readable ONNX model: {exc}") from exc
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 10:
        raise PackageError(f"{src}: ONNX opset {opset}; 10 or later is needed to wrap the axes")
    graph = model.graph
    initialised = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialised]
    if len(inputs) != 1 or not graph.output:
        raise PackageError(f"{src}: expected one image input and at least one output, "
                           f"got {len(inputs)} input(s) and {len(graph.output)} output(s)")
    x, y = inputs[0], graph.output[0]
    for value in (x, y):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 5:
            raise PackageError(f"{src}: {value.name} has rank {len(dims)}; "
                               "a 3D network takes (N, C, *, *, *)")
    perm_in = [0, 1, *(a + 2 for a in axes)]
    inverse = [0, 1, 0, 0, 0]
    for net_axis, portico_axis in enumerate(axes):
        inverse[portico_axis + 2] = net_axis + 2
    net_in, net_out = f"{x.name}__network", f"{y.name}__network"
    for node in graph.node:
        node.input[:] = [net_in if n == x.name else n for n in node.input]
        node.output[:] = [net_out if n == y.name else n for n in node.output]
    for node in graph.node:
        node.input[:] = [net_out if n == y.name else n for n in node.input]
    for info in graph.value_info:
        info.name = {x.name: net_in, y.name: net_out}.get(info.name, info.name)

    pre: list[onnx.NodeProto] = []
    post: list[onnx.NodeProto] = []
    if flips:
        axes_t = [f + 2 for f in flips]
        consts = {"starts": [-1] * len(flips), "ends": [_INT64_MIN] * len(flips), "axes": axes_t,
                  "steps": [-1] * len(flips)}
        for key, values in consts.items():
            graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64),
                                                             name=f"__portico_flip_{key}"))
        flip_inputs = [f"__portico_flip_{k}" for k in consts]
        pre = [helper.make_node("Transpose", [x.name], [f"{x.name}__t"], perm=perm_in),
               helper.make_node("Slice", [f"{x.name}__t", *flip_inputs], [net_in])]
        post = [helper.make_node("Slice", [net_out, *flip_inputs], [f"{y.name}__f"]),
                helper.make_node("Transpose", [f"{y.name}__f"], [y.name], perm=inverse)]
    else:
        pre = [helper.make_node("Transpose", [x.name], [net_in], perm=perm_in)]
        post = [helper.make_node("Transpose", [net_out], [y.name], perm=inverse)]
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    _permute_dims(x, inverse, helper, TensorProto)
    _permute_dims(y, inverse, helper, TensorProto)
    try:
        onnx.checker.check_model(model)
        onnx.save(model, str(dest))
    except Exception as exc:  # onnx raises ValidationError and protobuf errors
        raise PackageError(f"{src}: the wrapped ONNX model is invalid: {exc}") from exc


def _permute_dims(value: Any, perm: list[int], helper: Any, tensor_proto: Any) -> None:
    """Give a graph input/output the shape Portico sees: ``new[i] = network[perm[i]]``."""
    dims = list(value.type.tensor_type.shape.dim)
    shape = [d.dim_param if d.HasField("dim_param") else d.dim_value if d.HasField("dim_value") else None
             for d in dims]
    elem = value.type.tensor_type.elem_type or tensor_proto.FLOAT
    new = helper.make_tensor_value_info(value.name, elem, [shape[p] for p in perm])
    value.CopyFrom(new)
