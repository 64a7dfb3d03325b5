"""Custom op -> the same computation in plain torch ops, for exporters that cannot keep an op opaque (ONNX)."""

EXPORT_DECOMPOSITIONS: dict = {}


def register_export_decomposition(op, decomposition) -> None:
    """Export `op` as `decomposition`: a function of plain torch ops with the op's signature and outputs."""
    EXPORT_DECOMPOSITIONS[op] = decomposition
