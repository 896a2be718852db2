"""The names of every key hyfx stores in a graph's or a node's `meta`, so no module spells one as a loose string."""

TAGS = "hyfx"  # node.meta[TAGS]: the analysis tags (name, kind, region, block, ...) every later pass reads
CAPTURE = "hyfx_capture"  # gm.meta[CAPTURE]: the CaptureReport (method, parity with eager, float leaves)
EXAMPLE_SHAPE = "hyfx_example_shape"  # gm.meta[EXAMPLE_SHAPE]: the input shape the graph was captured with
SPLIT_OUTLIERS = "hyfx_split_outliers"  # gm.meta[SPLIT_OUTLIERS]: threshold and per-conv record of the split
BN_FACTORS = "hyfx_bn_factors"  # gm.meta[BN_FACTORS]: layer → the BatchNorm factor folded into its weight
OUTLIER_FRAME = "hyfx_outliers"  # nn_module_stack key of the convs the outlier split adds
REPARAMETERIZED = "hyfx_reparameterized"  # gm.meta[REPARAMETERIZED]: the norms whose output scales were moved (RepQ-ViT)
INPUT_SCALED = "hyfx_input_scaled"  # gm.meta[INPUT_SCALED]: the convs whose input channels were rescaled (HyQ's QADS)
SOFTMAX_APPROXIMATED = "hyfx_softmax_approximated"  # gm.meta[SOFTMAX_APPROXIMATED]: softmax nodes replaced (HyQ)
