"""prune-attattr: attention-head pruning with self-attention attribution.

Library API (the CLI is a thin layer over it):

- :func:`attention_attribution` - AttAttr scores ``[batch, layers, heads, seq, seq]`` (Hao et al. 2021, Eq. 2-3)
- :func:`prune_heads` - structural head pruning for the encoder families in :mod:`prune_attattr.families`
- :func:`prune_neurons`, :func:`prune_units` - structural feed-forward neuron pruning (and both units at once)
- :func:`remove_sublayers` - structural removal of whole attention / feed-forward sublayers (the identity)
- :func:`load_classifier`, :func:`load_pruned` - load a classifier / an exported pruned checkpoint
- :mod:`prune_attattr.importance` - head importance: ``attattr``, ``taylor``, ``accuracy_difference``,
  ``attention``, ``random``
- :func:`pruning_curve` - incremental pruning with evaluation after each step
- :func:`recover` - recovery training of a pruned model, distilled from the unpruned one
- :func:`run` with :func:`load_recipe` - the whole pipeline of ``prune-attattr recipe.yaml``
"""

from .attention import AttentionControl, register_attention
from .config import Recipe, RecipeError, load_recipe
from .prune.checkpoint import load_pruned, save_pruned
from .importance.attattr import attention_attribution
from .loading import load_classifier
from .models import kept_heads
from .prune.neurons import prune_neurons
from .prune.units import prune_units
from .prune.sublayers import remove_sublayers
from .pipeline import run
from .prune.heads import heads_to_prune, prune_heads, pruning_curve
from .recover.distill import recover

__version__ = "0.1.0"

__all__ = [
    "AttentionControl",
    "register_attention",
    "Recipe",
    "RecipeError",
    "load_recipe",
    "load_pruned",
    "save_pruned",
    "attention_attribution",
    "kept_heads",
    "load_classifier",
    "run",
    "heads_to_prune",
    "prune_heads",
    "prune_neurons",
    "prune_units",
    "remove_sublayers",
    "pruning_curve",
    "recover",
]
