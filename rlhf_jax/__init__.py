"""rlhf_jax: aligning language models with RL and preference optimisation in JAX.

Subpackages are imported on use (`from rlhf_jax import losses`), so importing
the package itself stays cheap.
"""

__version__ = "0.1.0"
