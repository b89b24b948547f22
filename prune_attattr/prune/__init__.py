"""Step 2 of the pipeline: choose heads and feed-forward neurons under a budget and remove them.

- :mod:`.cost`: FLOPs per token of every head and neuron (the budget's unit)
- :mod:`.search`: which units to keep under a FLOPs budget (Kwon et al. 2022's split search)
- :mod:`.budget`: the export rule's search over recovered candidates (``export.max_drop``)
- :mod:`.curve`: one curve step on the FLOPs axis (choose, mask, evaluate)
- :mod:`.heads`, :mod:`.neurons`: structural removal of heads and neurons (``prune_linear_layer``)
- :mod:`.sublayers`: structural removal of whole attention and feed-forward sublayers
- :mod:`.units`: all three at once (:func:`~prune_attattr.prune.units.prune_units`), the call that gives a model a pruned shape
- :mod:`.checkpoint`: a pruned shape on disk (config lists the pruned units) and its stock-loadable template

Imports only the base modules (families, models, attention); never recover/ or deploy/.
"""
