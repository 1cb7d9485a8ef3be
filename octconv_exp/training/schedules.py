"""Learning-rate schedules the torch ones do not cover in one class."""
import bisect

import torch

_Base = getattr(torch.optim.lr_scheduler, "LRScheduler", None) or torch.optim.lr_scheduler._LRScheduler


class WarmupMultiStepLR(_Base):
    """He et al. 2016's schedule: the learning rate times ``gamma`` at each milestone epoch,
    after an optional linear warm-up from ``warmup_factor`` x lr over ``warmup_epochs``
    (stepped once per epoch, as every schedule here). A plain class with a closed form, so its
    state_dict is a few numbers and resume is exact."""

    def __init__(self, optimizer, milestones=(), gamma=0.1, warmup_epochs=0, warmup_factor=0.1,
                 last_epoch=-1):
        milestones = [int(m) for m in milestones]
        if milestones != sorted(milestones) or any(m < 1 for m in milestones):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {milestones}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        if int(warmup_epochs) < 0 or not 0 < warmup_factor <= 1:
            raise ValueError("warmup_epochs must be >= 0 and warmup_factor in (0, 1], got "
                             f"{warmup_epochs} and {warmup_factor}")
        self.milestones, self.gamma = milestones, float(gamma)
        self.warmup_epochs, self.warmup_factor = int(warmup_epochs), float(warmup_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch):
        if epoch < self.warmup_epochs:
            return self.warmup_factor + (1 - self.warmup_factor) * epoch / self.warmup_epochs
        return self.gamma ** bisect.bisect_right(self.milestones, epoch)

    def get_lr(self):
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
