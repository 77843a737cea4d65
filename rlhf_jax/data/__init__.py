"""Datasets: TFDS array_record builders (no TensorFlow) and grain loaders."""
from rlhf_jax.data.builders import (GeneratedConfig, GeneratedDatasetBuilder, RlhfInstructions,
                                    RlhfMinicode, RlhfPreferencePairs, RlhfSyntheticText,
                                    build_dataset, config_name_for)
from rlhf_jax.data.datasets import (DEFAULT_MINICODE_SIZES, build_instructions, build_minicode,
                                    build_preference_pairs, build_synthetic_text)
from rlhf_jax.data.loader import (DecodedSource, GrainLoader, collate, load_split,
                                  make_grain_loader)
from rlhf_jax.data.synthetic import SYNTHETIC_TASKS, generate_synthetic
