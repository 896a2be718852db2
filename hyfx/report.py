"""Human-readable views of an analysed graph: the block table and graph drawings (DOT, PNG, SVG)."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from hyfx.errors import HyfxError
from hyfx.files import save_figure, write_text
from hyfx.graph import HybridGraph
from hyfx.meta import TAGS

KIND_COLUMNS = ("conv", "linear", "matmul", "softmax", "norm", "act", "reshape")
KIND_COLOURS = {"cnn": "#9ecae1", "transformer": "#fdae6b", "other": "#d9d9d9"}
BRIDGE_COLOUR = "#e31a1c"


def block_table(hg: HybridGraph) -> str:
    """Markdown table: one row per block with its kind, bridge flag and node counts; then the bridges."""
    header = ["block", "kind", "bridge", *KIND_COLUMNS]
    rows = [[b.name or "(root)", b.kind, "yes" if b.bridge else "", *(str(b.counts.get(k, 0)) for k in KIND_COLUMNS)]
            for b in hg.blocks if b.name or b.kind != "other"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]
    kinds = [b.kind for b in hg.blocks]
    out.append("")
    out.append(f"{kinds.count('cnn')} CNN blocks, {kinds.count('transformer')} Transformer blocks, "
               f"{len(hg.bridges)} bridge blocks")
    for bridge in hg.bridges:
        out.append(f"  bridge {bridge.block}: {bridge.describe()}")
    return "\n".join(out)


def block_graph(hg: HybridGraph) -> nx.DiGraph:
    """Blocks as nodes, data flow between blocks as edges."""
    graph = nx.DiGraph()
    for block in hg.blocks:
        graph.add_node(block.name or "(root)", kind=block.kind, bridge=block.bridge)
    for node in hg.nodes():
        dst = node.meta[TAGS]["block"] or "(root)"
        for src in node.all_input_nodes:
            if TAGS in src.meta:
                src_block = src.meta[TAGS]["block"] or "(root)"
                if src_block != dst:
                    graph.add_edge(src_block, dst)
    return graph


def _dot(hg: HybridGraph) -> str:
    graph = hg.to_networkx()
    lines = ["digraph hyfx {", "  node [shape=box, style=filled, fontsize=9];"]
    bridge_layers = hg.bridge_layers()
    for name, attrs in graph.nodes(data=True):
        label = attrs.get("name", name)
        colour = BRIDGE_COLOUR if label in bridge_layers else KIND_COLOURS.get(attrs.get("block_kind"), "#ffffff")
        lines.append(f'  "{name}" [label="{label}\\n{attrs.get("kind", attrs["op"])}", fillcolor="{colour}"];')
    for src, dst in graph.edges:
        lines.append(f'  "{src}" -> "{dst}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _draw(hg: HybridGraph, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph = block_graph(hg)
    order = list(graph.nodes)
    pos = {name: (i % 12, -(i // 12)) for i, name in enumerate(order)}  # execution order, wrapped in rows
    colours = [BRIDGE_COLOUR if graph.nodes[n]["bridge"] else KIND_COLOURS[graph.nodes[n]["kind"]] for n in order]
    fig, ax = plt.subplots(figsize=(min(24, 2 + 2 * min(len(order), 12)), 2 + 1.6 * (len(order) // 12 + 1)))
    nx.draw_networkx(graph, pos, ax=ax, node_color=colours, node_size=900, font_size=6, arrows=True,
                     node_shape="s", edge_color="#777777")
    ax.set_title("blocks: blue = CNN, orange = Transformer, red = Transformer entered through a bridge block")
    ax.axis("off")
    save_figure(fig, path, dpi=110)


def write_graph(hg: HybridGraph, path: str | Path) -> Path:
    """Write the tagged graph: node-level DOT, or a block-level PNG/SVG picture."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dot":
        write_text(path, _dot(hg))
    elif suffix in (".png", ".svg"):
        _draw(hg, path)
    else:
        raise HyfxError(f"cannot write a graph as {suffix or 'a file without suffix'}: use .dot, .png or .svg")
    return path
