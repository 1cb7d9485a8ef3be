"""The Backend interface: every hook the run lifecycle (``octconv_exp.training.runner``) calls.

A backend runs the one training loop on a kind of hardware. :class:`Backend` declares what the
lifecycle asks of it, with the defaults a backend without the feature wants, so the lifecycle
calls each hook without asking whether it is there. native (CPU/GPU) and ipu subclass it.

A training loader that can start a pass part-way declares it by being a
:class:`ResumableLoader` and its backend saying so (``resumes_inside_epoch``): then a stop inside
an epoch is checkpointed where it happened; otherwise the epoch is redone from the last
whole-epoch checkpoint.
"""
import abc
import contextlib
from typing import Any, Optional, Protocol, Tuple


class ResumableLoader(Protocol):
    """A training loader whose passes a checkpoint can record and a resume can continue
    (``data.BatchLoader``, ``streaming.StreamingLoader``)."""

    device: Any

    def __len__(self) -> int: ...

    def state_dict(self, inside_pass: bool = False) -> dict:
        """Where the shuffling stands (``inside_pass``: where the current pass started)."""

    def resume_pass(self, generator_state, skip: int, epoch: Optional[int] = None) -> None:
        """Make the next pass the recorded one, minus its first ``skip`` batches."""


class Backend(abc.ABC):
    """What the run lifecycle needs of a backend.

    Subclasses build the model, optimizer and loaders for their hardware and wrap them into a
    training step ``(images, labels) -> (log_probs, loss)`` and an inference step
    ``images -> log_probs``; the hooks with a body here default to "nothing to do".
    """

    #: The device kind, as metrics.json reports it ("cpu", "cuda", "ipu").
    name: str = ""
    #: speed.compile (CPU/GPU): whether the training steps run torch.compile'd (None: not
    #: decided yet, or not a choice on this hardware) and why; reported in metrics.json.
    compile: Optional[bool] = None
    compile_reason: Optional[str] = None
    #: speed.malloc (CPU/GPU): what was done about glibc's malloc (None: nothing to decide).
    malloc_decision: Optional[str] = None
    #: Exceptions of the device's own software that mean the device or its compiler refused
    #: (no IPUs to attach, a failed compilation): the lifecycle reports them in one line.
    device_errors: Tuple[type, ...] = ()
    #: The device computes on data of its own (ipu.synthetic_data): no accuracy, no validation.
    synthetic_data: bool = False
    #: Its training loader is a :class:`ResumableLoader`: a checkpoint may be taken inside an
    #: epoch. Otherwise only whole epochs are checkpointed.
    resumes_inside_epoch: bool = False

    @abc.abstractmethod
    def build_model(self, num_classes):
        """The configured model, on this backend's device."""

    @abc.abstractmethod
    def build_optimizer(self, model):
        """The configured optimizer over ``model``'s parameters."""

    @abc.abstractmethod
    def make_loaders(self, data, train=True):
        """``(train_loader, test_loader)``; the training loader is None with ``train=False``."""

    @abc.abstractmethod
    def make_val_loader(self, data):
        """The validation split's loader, or None without one."""

    @abc.abstractmethod
    def training_step(self, model, optimizer):
        """A callable ``(images, labels) -> (log_probs or None, loss)`` that trains one step."""

    @abc.abstractmethod
    def inference_step(self, model):
        """A callable ``images -> log_probs``."""

    @abc.abstractmethod
    def profile(self, model, optimizer, profile_dir, image_shape, num_classes):
        """Profile one training iteration into ``profile_dir``; returns the files written."""

    @contextlib.contextmanager
    def validating(self, model):
        """The inference step of a validation pass between two training epochs; the model goes
        back to the mode it was in after it."""
        training = model.training
        try:
            yield self.inference_step(model)
        finally:
            model.train(training)

    def start_at_epoch(self, epoch):
        """resume=true, before :meth:`make_loaders`: the training order continues at ``epoch``
        (a loader whose order is fixed when it starts needs it; a resumable one is told by
        ``resume_pass``)."""

    def plan(self, steps_left):
        """The training steps the run still has to take (speed.compile=auto weighs them)."""

    def on_epoch_end(self, optimizer):
        """After the learning-rate schedule stepped: the optimizer changed on the host."""

    def sync_to_host(self, model):
        """Before the host reads the weights (a checkpoint): bring the device's back."""

    def finish_training(self, model):
        """Training is over: weights to the host, and the device free for inference."""

    def close(self):
        """The run ends, however it ends: stop loader workers, release the device."""
