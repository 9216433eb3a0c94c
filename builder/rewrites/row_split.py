"""Dense layers split by rows so that one image's rows divide evenly among the CPU's threads.

At batch 1 OpenVINO runs a single image over every core (its LATENCY compile), and its INT8 Dense
kernels share the rows out among the threads in blocks. At a ViT's 197 tokens or a Mixer's 196 one
thread works longer than the others at every layer while they wait; at 192 rows two threads each
keep the pace of one thread alone (``bench/results/row_split.md``, measured: OpenVINO documents no
block size). Splitting each chain of row-wise layers (Dense, GELU, the quantizers between) into the
first rows, a multiple of ``ROW_BLOCK`` times the thread count, and the few left, then joining them,
gives the threads equal shares of the bulk; the remainder is a small layer of its own.

Every output row is computed from its own input row by the same operations, so the outputs are the
same; the build checks that on the evaluation images and times the split against the graph as it was
(:meth:`builder.bundle.candidates.Evaluation.row_split`), whose head to head includes whatever the slices
and the join cost.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from builder.export.tidy import replace_uses
from builder.rewrites.graph_passes import per_tensor_grid

# rows per thread the first part is a multiple of: 32 x 2 threads = 192 measured even (bench/row_split_bench.py)
ROW_BLOCK = 32
_ROW_WISE = {"Gemm", "Gelu", "QuantizeLinear", "DequantizeLinear"}


def balanced_rows(rows: int, threads: int, block: int) -> int | None:
    """The rows of the first part: the most that are a whole number of blocks for every thread, or None where
    ``rows`` already is one (or is too few to split)."""
    step = block * threads
    first = rows // step * step
    return first if 0 < first < rows else None


def image_rows(model: ir.Model) -> dict[str, int]:
    """Rows of each ``Gemm``'s input for one image (value name -> rows), by shape inference at batch 1."""
    proto = ir.to_proto(model)
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].Clear()
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    rows = {}
    for info in inferred.graph.value_info:
        dims = info.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[0].dim_value:
            rows[info.name] = dims[0].dim_value
    return rows


def _constant(value: ir.Value | None) -> bool:
    """A constant, or a constant dequantized (how a Q/DQ graph holds weights and biases)."""
    if value is None or value.const_value is not None:
        return value is not None
    producer = value.producer()
    if producer is None or producer.op_type != "DequantizeLinear":
        return False
    quantized = producer.inputs[0]
    return quantized is not None and quantized.const_value is not None


def _dense(node: ir.Node) -> bool:
    """A Gemm with a constant weight and bias that transposes no input."""
    if node.op_type != "Gemm" or node.attributes.get_int("transA") or len(node.inputs) < 2:
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return _constant(node.inputs[1]) and (bias is None or _constant(bias))


def _row_wise(node: ir.Node) -> bool:
    """Computes each row from the same row alone: a constant Dense, GELU, or a quantizer with one grid."""
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return per_tensor_grid(node) is not None
    return node.op_type == "Gelu" or _dense(node)


def _chain(first: ir.Node, graph: ir.Graph) -> list[ir.Node]:
    """``first`` and the row-wise nodes that follow it one by one, up to the last Dense among them."""
    chain = [first]
    while True:
        out = chain[-1].outputs[0]
        readers = [use.node for use in out.uses()]
        if out in graph.outputs or len(readers) != 1 or not _row_wise(readers[0]) or readers[0].inputs[0] is not out:
            break
        chain.append(readers[0])
    while chain[-1].op_type != "Gemm":
        chain.pop()
    return chain


def split_rows(model: ir.Model, threads: int, block: int | None = None) -> int | None:
    """Split every row-wise chain that starts at a constant Dense layer reading a quantized input (see the
    module docstring) for ``threads`` threads and blocks of ``block`` rows (default :data:`ROW_BLOCK`);
    returns the rows of the first part (one image's rows are the same count at every layer split), or None
    where nothing was split."""
    graph, rows = model.graph, image_rows(model)
    chains: list[tuple[list[ir.Node], int]] = []
    taken: set[int] = set()
    for node in list(graph):
        source = node.inputs[0] if node.inputs else None
        producer = source.producer() if source is not None else None
        if source is None or producer is None or producer.op_type != "DequantizeLinear":
            continue
        if id(node) in taken or not _dense(node):
            continue
        first = balanced_rows(rows.get(source.name or "", 0), threads, block or ROW_BLOCK)
        if first is not None:
            chain = _chain(node, graph)
            taken.update(id(n) for n in chain)
            chains.append((chain, first))
    if not chains:
        return None
    for chain, first in chains:
        _split(graph, chain, first)
    RemoveUnusedNodesPass()(model)
    return chains[0][1]


def _split(graph: ir.Graph, chain: list[ir.Node], first: int) -> None:
    def constant(name: str, value: int) -> ir.Value:
        v = ir.Value(name=f"{chain[0].name}/rows/{name}", const_value=ir.tensor(np.array([value], np.int64)))
        graph.register_initializer(v)
        return v

    axis, start, middle, end = (
        constant("axis", 0),
        constant("start", 0),
        constant("first", first),
        constant("end", 2**62),
    )
    new: list[ir.Node] = []
    parts = []
    for part, (begin, stop) in enumerate([(start, middle), (middle, end)]):
        rows = ir.node("Slice", [chain[0].inputs[0], begin, stop, axis], name=f"{chain[0].name}/rows{part}")
        new.append(rows)
        current = rows.outputs[0]
        for node in chain:
            copy = ir.node(
                node.op_type,
                [current, *node.inputs[1:]],
                attributes=dict(node.attributes),
                domain=node.domain,
                name=f"{node.name}/rows{part}",
            )
            new.append(copy)
            current = copy.outputs[0]
        parts.append(current)
    joined = ir.node("Concat", parts, attributes={"axis": 0}, name=f"{chain[-1].name}/rows")
    new.append(joined)
    graph.insert_before(chain[-1], new)  # what any node of the chain reads exists by then
    replace_uses(graph, chain[-1].outputs[0], joined.outputs[0])
    for node in reversed(chain):
        graph.remove(node, safe=True)
