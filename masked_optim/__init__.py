"""masked-optim: AdamW with importance masking and a restoring force against forgetting."""
from masked_optim.optimizer import MaskedAdamW

__all__ = ["MaskedAdamW"]
__version__ = "0.1.0"
