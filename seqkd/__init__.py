"""seqkd: sequence-model distillation on the Hugging Face stack."""

__version__ = "0.1.0"

# Importing the models registers them with transformers' Auto classes.
from seqkd import models  # noqa: E402,F401
