"""``--average-last K``: the classifier's weights averaged over its last K epochs (docs/method.md §5,
the fine-tune stage's option), with :class:`torch.optim.swa_utils.AveragedModel`.

The average is the plain mean of the weights and the BatchNorm statistics as they stand at the
end of each of epochs ``epochs - K`` .. ``epochs - 1`` (the integer ``num_batches_tracked``
counters are the last epoch's). It is kept in ``last.pt`` with the epochs it holds, so a resumed
run ends with the same average as an uninterrupted one; a resume that moves the window (another
``--epochs``) restarts it and says so.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel


class LastEpochsAverage:
    """A running mean of a model's state over the epochs ``[first, epochs)``."""

    def __init__(self, model: torch.nn.Module, epochs: int, last: int):
        self.first = epochs - last
        self.average = AveragedModel(model, use_buffers=True)
        self.epochs: list[int] = []

    def update(self, model: torch.nn.Module, epoch: int) -> None:
        """Add the model's state at the end of ``epoch`` if it is inside the window."""
        if epoch < self.first:
            return
        self.average.update_parameters(model)
        self.epochs.append(epoch)

    def model_state(self, model: torch.nn.Module) -> dict:
        """The averaged state dict, integer buffers taken from ``model`` (the last epoch)."""
        state = self.average.module.state_dict()
        last = model.state_dict()
        return {k: v if v.is_floating_point() else last[k].clone() for k, v in state.items()}

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(), "epochs": list(self.epochs),
                "first": self.first}

    def load_state_dict(self, state: dict, log=print) -> None:
        epochs = list(state["epochs"])
        if epochs and epochs[0] < self.first:
            log(f"--average-last: the window moved to epochs {self.first}.. (another --epochs): "
                f"the average restarts and holds the epochs still to come")
            return
        self.average.load_state_dict(state["average"])
        self.epochs = epochs
