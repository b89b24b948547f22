"""Step 4 of the pipeline: what ships and how fast it is.

- :mod:`.onnx_export`: ONNX export of a (pruned) classifier, checked against PyTorch
- :mod:`.quantize`: int8 (ONNX Runtime dynamic and static quantization) and fusions, verified against float
- :mod:`.layer_norm`: the fused SkipLayerNormalization split back into Add + LayerNormalization (faster on CPU)
- :mod:`.onnx_eval`: the dev metric of an ONNX graph with ONNX Runtime
- :mod:`.bench`: latency of graphs side by side (``prune-attattr bench``)
- :mod:`.deployment`: the export stage's deployment of the pruned and unpruned graphs

May import prune/ (to rebuild a pruned shape); prune/ never imports it.
"""
