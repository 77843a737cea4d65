"""Selections as masks/weights: filtration, R², rejection, AutoIF pairs, rehearsal."""
from rlhf_jax.selection.autoif_pairs import autoif_pair_indices
from rlhf_jax.selection.filtration import STRATEGIES
from rlhf_jax.selection.filtration import filtration_distribution
from rlhf_jax.selection.filtration import filtration_weights
from rlhf_jax.selection.filtration import rank_order
from rlhf_jax.selection.r2 import binned_r_squared
from rlhf_jax.selection.r2 import r_squared
from rlhf_jax.selection.rehearsal import kmeans
from rlhf_jax.selection.rehearsal import per_group_top_k
from rlhf_jax.selection.rehearsal import rehearsal_mask
from rlhf_jax.selection.rejection import best_of_n_mask
from rlhf_jax.selection.rejection import threshold_mask
