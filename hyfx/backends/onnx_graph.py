"""Housekeeping shared by the ONNX graph passes (the QDQ lowering's and the ORT layout rewrite's)."""

from __future__ import annotations

import onnx


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Removes (in place) the initializers no node reads and no graph output names."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
