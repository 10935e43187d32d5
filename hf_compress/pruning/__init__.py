"""Structured and unstructured pruning: one-shot functions, and the training-time PruningCallback.

>>> from hf_compress.pruning import magnitude_prune, prune_heads, prune_ffn_neurons, drop_layers, sparsity_report
>>> from hf_compress.pruning import prune_hidden
"""

from hf_compress.pruning.hidden import prune_hidden
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads
from hf_compress.pruning.unstructured import magnitude_prune, sparsity_report

__all__ = ["drop_layers", "magnitude_prune", "prune_ffn_neurons", "prune_heads", "prune_hidden", "sparsity_report"]
