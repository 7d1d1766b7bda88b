"""Subclasses of the ``torch.nn`` norm modules whose forward runs cnorm's kernels.

Each class is its ``torch.nn`` base with only ``forward`` replaced: the same
constructor, parameters, buffers, state-dict keys, train/eval behaviour and
running-statistics update (momentum, cumulative averages when momentum is
None, ``num_batches_tracked``), so a state dict moves between the two either
way and :func:`cnorm.torch.replace_norms` can turn a module into its subclass
in place. Outputs keep the input's memory format (``channels_last`` included).
"""

from __future__ import annotations

import torch

from . import batch_norm, group_norm, instance_norm, layer_norm, rms_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
           "GroupNorm", "LayerNorm", "RMSNorm", "REPLACEMENTS"]


def _batch_norm_forward(self, input):
    """torch.nn's _BatchNorm.forward, calling cnorm's operator."""
    self._check_input_dim(input)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    bn_training = self.training or (self.running_mean is None and self.running_var is None)
    keep = not self.training or self.track_running_stats
    return batch_norm(input, self.running_mean if keep else None, self.running_var if keep else None,
                      self.weight, self.bias, bn_training, factor, self.eps)


def _instance_norm_forward(self, input):
    """torch.nn's _InstanceNorm.forward (unbatched inputs included), calling cnorm's operator."""
    self._check_input_dim(input)
    unbatched = input.dim() == self._get_no_batch_dim()
    if unbatched:
        input = input.unsqueeze(0)
    y = instance_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                      self.training or not self.track_running_stats,
                      self.momentum if self.momentum is not None else 0.0, self.eps)
    return y.squeeze(0) if unbatched else y


class BatchNorm1d(torch.nn.BatchNorm1d):
    forward = _batch_norm_forward


class BatchNorm2d(torch.nn.BatchNorm2d):
    forward = _batch_norm_forward


class BatchNorm3d(torch.nn.BatchNorm3d):
    forward = _batch_norm_forward


class InstanceNorm1d(torch.nn.InstanceNorm1d):
    forward = _instance_norm_forward


class InstanceNorm2d(torch.nn.InstanceNorm2d):
    forward = _instance_norm_forward


class InstanceNorm3d(torch.nn.InstanceNorm3d):
    forward = _instance_norm_forward


class GroupNorm(torch.nn.GroupNorm):
    def forward(self, input):
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


for _cls in (BatchNorm1d, BatchNorm2d, BatchNorm3d, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, GroupNorm,
             LayerNorm, RMSNorm):
    _cls.__doc__ = (f"``torch.nn.{_cls.__name__}`` running cnorm's kernels: the same constructor, parameters, "
                    f"buffers and state dict; only forward differs.")
    _cls.__module__ = __name__

#: torch.nn class -> its cnorm subclass (what replace_norms swaps)
REPLACEMENTS = {cls.__bases__[0]: cls for cls in (BatchNorm1d, BatchNorm2d, BatchNorm3d, InstanceNorm1d,
                                                   InstanceNorm2d, InstanceNorm3d, GroupNorm, LayerNorm, RMSNorm)}
del _cls
