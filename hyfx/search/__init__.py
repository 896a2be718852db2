"""Layer-wise candidate search, the engine under the search-based recipes (Q-HyViT, EasyQuant, PTQ4ViT).

`sampling` draws each layer's input/output rows from the calibration images, `problems` states each layer's
quantization problem (its sides: weights, inputs, outputs), `candidates` holds the scale grids and objectives
(cosine, Hessian-weighted), and `layerwise` runs the search over the graph in order, bridge blocks included.
"""
