"""Step 3 of the pipeline: train or fit what pruning left.

- :mod:`.finetune`: fine-tuning of the unpruned classifier (cached)
- :mod:`.distill`: recovery by knowledge distillation from the unpruned model
- :mod:`.rescale`: least squares (Kwon et al. 2022's layer-wise rescaling; seconds, no training)

Imports the base modules, :mod:`prune_attattr.loading` and prune/; never deploy/.
"""
