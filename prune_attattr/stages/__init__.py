"""The stages of a run, one module each, in the order :func:`prune_attattr.pipeline.run` composes them:

- :mod:`.context` - :class:`RunContext` and :class:`Prepared`, shared by every stage; the cached dev evaluation
- :mod:`.prepare` - load, check, fine-tune; evaluate the unpruned model
- :mod:`.importance` - head importance per method (cached)
- :mod:`.curves` - pruning curves (each step cached; the iterative schedule with brief recoveries)
- :mod:`.recovery` - recovery of export candidates, the budget searched after recovery, the cost table
- :mod:`.export` - the exported model chosen, saved, checked against PyTorch and ONNX, timed
- :mod:`.analyses` - the paper's analyses the recipe enables
- :mod:`.report` - the report dict and the atomic write of every output

Stages import the layers below them (methods, export, training, models, data, base); nothing below
imports a stage. Within the package the imports run one way: every module imports :mod:`.context`,
:mod:`.curves` imports :mod:`.importance`, :mod:`.recovery` imports :mod:`.prepare` and :mod:`.export`
(:mod:`.curves` names :class:`.recovery.RecoveryState` in type hints only).
"""
