"""CPU and CUDA: plain PyTorch."""
import contextlib
import functools
import logging
import os
import time

import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from ..data.datasets import BatchLoader
from ..data.streaming import StreamingLoader
from ..models.octave import build_model, model_name
from . import allocator, distributed
from .base import Backend
from .checks import check_optimizer_for_device

log = logging.getLogger("octconv_exp")


def optimizer_kwargs(opt_cfg):
    """The optimizer node without our own bookkeeping key ``name``."""
    node = OmegaConf.to_container(opt_cfg, resolve=True)
    node.pop("name", None)
    return node


def use_channels_last(setting, device_type):
    """speed.channels_last: auto means on for the CPU, where it was measured faster for every
    conv mode (README, Performance), and off on CUDA, where it has not been measured here."""
    setting = str(setting).lower()
    if setting == "auto":
        return device_type == "cpu"
    return setting == "true"


def read_compile_measurements(path=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "compile_measured.yaml")):
    """compile_measured.yaml as ``{device type: {"model/conv": (compile s, step ratio)}}``."""
    with open(path, encoding="utf-8") as f:
        table = yaml.safe_load(f) or {}
    return {device: {key: (float(v[0]), float(v[1])) for key, v in entries.items()}
            for device, entries in table.items()}


#: torch.compile against eager where this project measured it: device type -> "model/conv" ->
#: (seconds until the first two compiled steps were done, compiled step time / eager step
#: time). The measurements are data (compile_measured.yaml, with when and how each was taken),
#: not code: a new machine's numbers replace them without touching this module.
#: ``speed.compile=auto`` compiles only a model and conv mode listed for the device: a device
#: type or model without an entry is not compiled (unmeasured).
COMPILE_MEASURED = read_compile_measurements()
#: A compiled step has to be at least this much faster to be worth it (smaller differences
#: were within run-to-run noise).
COMPILE_MIN_SAVING = 0.05
#: Under speed.compile=auto, the first training steps run eager: the first PROBE_SKIP warm up,
#: the next PROBE_STEPS are timed to estimate what compiling would save over the run.
PROBE_SKIP, PROBE_STEPS = 2, 5


def compile_decision(setting, device_type, model="seed_cnn", conv="vanilla", deterministic=False,
                     steps_left=None, eager_step_s=None, measured=None, torch_version=None):
    """Whether to torch.compile, and why: ``(True | False | None, reason)``. None: auto needs
    ``steps_left`` and ``eager_step_s`` (timed eager steps) to decide.

    auto compiles when ``steps_left x eager_step_s x (1 - measured ratio)`` (the time it would
    save) exceeds the measured compilation time; never on torch < 2.1 (the Poplar SDK's 2.0.1:
    torch.compile's first release), with ``deterministic=true`` (compiled kernels are outside
    torch's deterministic-algorithm checks), for a device type, model or conv mode not
    measured, or where compiled steps measured less than COMPILE_MIN_SAVING faster."""
    setting = str(setting).lower()
    if setting in ("true", "false"):
        return setting == "true", f"speed.compile={setting}"
    measured = COMPILE_MEASURED if measured is None else measured
    version = torch_version or torch.__version__
    major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if major_minor < (2, 1):
        return False, f"auto: off on torch {version} (torch.compile is used from torch 2.1)"
    if deterministic:
        return False, "auto: off with deterministic=true"
    key = f"{model}/{conv}"
    entry = measured.get(device_type, {}).get(key)
    if entry is None:
        return False, (f"auto: off: torch.compile has not been measured for {key} on "
                       f"{device_type} (bench/bench_cuda.py measures it)")
    warmup_s, ratio = entry
    if ratio > 1 - COMPILE_MIN_SAVING:
        return False, (f"auto: off: compiled steps of {key} measured {ratio:.2f}x eager's on "
                       f"{device_type}")
    if steps_left is None or eager_step_s is None:
        return None, "auto: deciding after timing the first eager steps"
    saved = steps_left * eager_step_s * (1 - ratio)
    verdict = saved > warmup_s
    return verdict, (f"auto: {'on' if verdict else 'off'}: {steps_left} steps x "
                     f"{eager_step_s * 1e3:.1f} ms x {1 - ratio:.0%} saved = {saved:.0f} s "
                     f"{'>' if verdict else '<='} {warmup_s:.0f} s of compilation")


class NativeBackend(Backend):
    """CPU and CUDA: the model itself (torch.compile'd and DistributedDataParallel where
    configured), in-memory or streamed :class:`~octconv_exp.backends.base.ResumableLoader` loaders."""

    resumes_inside_epoch = True

    def __init__(self, cfg, device):
        self.cfg = cfg
        self.device = torch.device(device)
        self.name = self.device.type
        speed = cfg.speed
        self.memory_format = (torch.channels_last if use_channels_last(speed.channels_last, self.device.type)
                              else torch.contiguous_format)
        cuda = self.device.type == "cuda"
        # speed.malloc: glibc keeps freed memory mapped (CPU runs; allocator.py)
        self.malloc_decision = allocator.apply(speed.get("malloc", "auto"), self.device.type)
        self.autocast = bool(speed.autocast_bf16) and cuda
        if cuda and speed.cudnn_benchmark and not cfg.deterministic:
            torch.backends.cudnn.benchmark = True
        self.compiled = None
        # speed.compile: decided now for true/false and where auto is off; otherwise (None)
        # by the training step after timing its first eager steps (steps_left: plan()).
        self.compile_key = dict(model=model_name(cfg), conv=cfg.conv.mode)
        self.compile, self.compile_reason = compile_decision(
            speed.compile, self.device.type, deterministic=bool(cfg.get("deterministic", False)),
            **self.compile_key)
        self.steps_left = None
        self.data_parallel = None  # the model in DistributedDataParallel (torchrun ranks)
        # Its compiled twin: apart from the model's, which inference uses (a DDP forward
        # would broadcast buffers, a collective, while each rank evaluates its own images).
        self.compiled_data_parallel = None
        self.loaders = []  # streaming loaders, whose worker processes close() stops
        self.synthetic_data = False  # real images always

    def build_model(self, num_classes):
        model = build_model(self.cfg, num_classes=num_classes).to(self.device)
        return model.to(memory_format=self.memory_format)

    def runnable(self, model, training=False):
        """The module the steps call: the model, or its torch.compile'd twin (same weights);
        data-parallel training steps go through the model's DistributedDataParallel wrapper
        (inference reads the model itself: each rank evaluates its own images)."""
        compile_now = bool(self.compile)
        if training and distributed.WORLD.active:
            if self.data_parallel is None:
                self.data_parallel = distributed.wrap(model, self.device)
            if not compile_now:
                return self.data_parallel
            if self.compiled_data_parallel is None:
                self.compiled_data_parallel = torch.compile(self.data_parallel)
            return self.compiled_data_parallel
        if not compile_now:
            return model
        if self.compiled is None:
            self.compiled = torch.compile(model)
        return self.compiled

    def plan(self, steps_left):
        """The training steps this run still has to take (speed.compile=auto weighs them)."""
        self.steps_left = int(steps_left)

    def forward(self, module, *args):
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return module(*args)
        return module(*args)

    def build_optimizer(self, model):
        check_optimizer_for_device(self.cfg.optimizer.name)
        return instantiate(optimizer_kwargs(self.cfg.optimizer), params=model.parameters())

    def make_loaders(self, data, train=True):
        """Data-parallel ranks each take their shard of every training batch and their part
        of the test set."""
        t = self.cfg.trainer
        world = distributed.WORLD
        loader_class = self.loader_class(data)
        if train:
            # dataset.augment: the run's seed decides the augmentation, as it does the order.
            train = loader_class(data.train, t.batch_size, data.mean, data.std, shuffle=True,
                                 drop_last=t.drop_last, device=self.device, seed=self.cfg.seed,
                                 memory_format=self.memory_format,
                                 augment=bool(self.cfg.dataset.get("augment", False)),
                                 augment_seed=self.cfg.seed, rank=world.rank,
                                 world_size=world.world_size)
        else:
            train = None
        # Evaluation sees every test image: no shuffling, no dropped tail, no augmentation.
        test = self.evaluation_loader(data, data.test)
        if hasattr(train, "close"):
            self.loaders.append(train)
        return train, test

    def evaluation_loader(self, data, images):
        """This rank's part of a test or validation set, in order, unaugmented."""
        world = distributed.WORLD
        loader = self.loader_class(data)(images.part(world.rank, world.world_size),
                                         self.cfg.trainer.test_batch_size, data.mean, data.std,
                                         shuffle=False, drop_last=False, device=self.device,
                                         memory_format=self.memory_format)
        if hasattr(loader, "close"):
            self.loaders.append(loader)
        return loader

    def loader_class(self, data):
        """:class:`BatchLoader` over images in memory; over a streamed image folder, a
        :class:`~octconv_exp.data.streaming.StreamingLoader` with ``dataset.workers`` workers."""
        if not data.streamed:
            return BatchLoader

        return functools.partial(StreamingLoader, workers=int(self.cfg.dataset.get("workers", 2)))

    def make_val_loader(self, data):
        """The validation split as the test set is read (None without one)."""
        if data.val is None:
            return None
        return self.evaluation_loader(data, data.val)

    def training_step(self, model, optimizer):
        model.train()
        module = self.runnable(model, training=True)
        probe = {"steps": 0, "seconds": []}

        def decide():
            """speed.compile=auto: time eager steps, then compile if it repays itself; the
            module the rest of the steps call once decided, else None."""
            probe["steps"] += 1
            n = probe["steps"]
            if n <= PROBE_SKIP:
                return None
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            probe["seconds"].append(time.perf_counter())  # the end of the previous step
            if n <= PROBE_SKIP + PROBE_STEPS:
                return None
            intervals = [b - a for a, b in zip(probe["seconds"], probe["seconds"][1:])]
            eager_s = sorted(intervals)[len(intervals) // 2]
            # Data-parallel ranks decide alike: on the slowest rank's time (microseconds).
            eager_s = distributed.max_over_ranks(int(eager_s * 1e6)) / 1e6
            if self.steps_left is None:
                self.compile, self.compile_reason = False, "auto: off: run length unknown"
            else:
                self.compile, self.compile_reason = compile_decision(
                    "auto", self.device.type, steps_left=max(0, self.steps_left - n + 1),
                    eager_step_s=eager_s, **self.compile_key)
            log.info("speed.compile=%s", self.compile_reason)
            return self.runnable(model, training=True)

        def step(images, labels):
            nonlocal module
            if self.compile is None:
                decided = decide()
                if decided is not None:
                    module = decided
            optimizer.zero_grad(set_to_none=True)
            output, loss = self.forward(module, images, labels)
            loss.backward()
            optimizer.step()
            return output.detach(), loss.detach()

        return step

    def inference_step(self, model):
        model.eval()
        module = self.runnable(model)

        def infer(images):
            with torch.no_grad():
                return self.forward(module, images)

        return infer

    @contextlib.contextmanager
    def validating(self, model):
        """The inference step for a validation pass inside training: the model in eval mode
        for the pass, back in training mode after it."""
        training = model.training
        try:
            yield self.inference_step(model)
        finally:
            model.train(training)

    def on_epoch_end(self, optimizer):
        """The optimizer lives here: a scheduler's changes already apply."""

    def sync_to_host(self, model):
        """The weights are the model's own: nothing to copy."""

    def finish_training(self, model):
        """Weights already live in ``model``; nothing to copy back."""

    def close(self):
        """Stop the worker processes of streaming loaders, and let go of the DDP wrappers:
        their reducers hold the process group, which :func:`distributed.teardown` then
        destroys while the interpreter is whole (not at its finalization)."""
        for loader in self.loaders:
            loader.close()
        self.loaders = []
        self.data_parallel = self.compiled_data_parallel = None

    def profile(self, model, optimizer, profile_dir, image_shape, num_classes):
        """One training iteration under torch.profiler (after one warm-up iteration), of a
        batch of the data's ``image_shape`` (C, H, W) and ``num_classes``."""
        t = self.cfg.trainer
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(t.batch_size, *image_shape, generator=gen).to(self.device).contiguous(
            memory_format=self.memory_format)
        labels = torch.randint(0, num_classes, (t.batch_size,), generator=gen).to(self.device)
        step = self.training_step(model, optimizer)
        step(images, labels)  # warm-up: first-call allocations are not what we want to see
        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        os.makedirs(profile_dir, exist_ok=True)
        with profile(activities=activities, record_shapes=True) as prof:
            step(images, labels)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        trace = os.path.join(profile_dir, "trace.json")
        prof.export_chrome_trace(trace)
        sort_key = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_key, row_limit=30)
        with open(os.path.join(profile_dir, "summary.txt"), "w") as f:
            f.write(table + "\n")
        return [trace, os.path.join(profile_dir, "summary.txt")]
