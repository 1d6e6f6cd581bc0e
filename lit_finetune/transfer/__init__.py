"""Fine-tuning mechanics shared by all modules: pretrained loading, L2-SP, EWC, CDC, parameter groups."""

from lit_finetune.transfer.cdc import DistanceConsistency, anchor_noise, distance_consistency_loss
from lit_finetune.transfer.diffaugment import DiffAugment
from lit_finetune.transfer.ewc import EWC, empirical_fisher, generator_fisher
from lit_finetune.transfer.l2sp import L2SP
from lit_finetune.transfer.lr_factors import (
    add_lr_factor_fn,
    effective_lr,
    install_lr_factor_hooks,
    install_lr_scale,
    set_lr_factor,
)
from lit_finetune.transfer.param_groups import (
    block_groups,
    check_groups_cover,
    module_group,
    trainable_only,
    weight_decay_groups,
)
from lit_finetune.transfer.peft import (
    PEFT,
    PEFT_METHODS,
    delta_state_dict,
    merge_into_state,
    trainable_parameter_count,
)
from lit_finetune.transfer.pretrained import (
    LoadReport,
    PretrainedLoadError,
    is_torchvision_weight_name,
    load_pretrained,
    read_state_dict,
)

__all__ = [
    "DiffAugment",
    "DistanceConsistency",
    "EWC",
    "PEFT",
    "PEFT_METHODS",
    "L2SP",
    "LoadReport",
    "PretrainedLoadError",
    "add_lr_factor_fn",
    "block_groups",
    "check_groups_cover",
    "anchor_noise",
    "delta_state_dict",
    "distance_consistency_loss",
    "effective_lr",
    "empirical_fisher",
    "generator_fisher",
    "install_lr_factor_hooks",
    "install_lr_scale",
    "is_torchvision_weight_name",
    "load_pretrained",
    "merge_into_state",
    "module_group",
    "read_state_dict",
    "set_lr_factor",
    "trainable_only",
    "trainable_parameter_count",
    "weight_decay_groups",
]
