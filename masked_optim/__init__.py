"""masked-optim: AdamW with importance masking and a restoring force against forgetting."""
from masked_optim.optimizer import MaskedAdamW
from masked_optim.param_groups import decay_groups, layerwise_lr_groups
from masked_optim.schedules import DensityScheduler

__all__ = ["MaskedAdamW", "DensityScheduler", "decay_groups", "layerwise_lr_groups"]
__version__ = "0.1.0"
