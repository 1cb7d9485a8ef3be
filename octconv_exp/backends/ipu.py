"""Graphcore IPUs through PopTorch.

Written against the public PopTorch API (graphcore/poptorch, python/: options.py,
_poplar_executor.py, _dataloader.py, optim.py, ops.py) and tested with a test double of
``poptorch`` (tests/poptorch_double) that enforces those signatures and semantics:

- ``poptorch.Options`` are frozen once a DataLoader or a model uses them, so the training and
  the inference model each get their own Options; inference models refuse gradient
  accumulation and return every output (``OutputMode.All``); training returns the last
  micro-batch by default (``OutputMode.Final``).
- A batch given to a PopTorch model is the *combined* batch:
  batch_size x device_iterations x replicas x gradient_accumulation, split on the device into
  micro-batches with one optimizer step per device iteration.
- A compiled model only runs the batch shape it was compiled for: the test images that do not
  fill a whole combined batch are padded to one, and only their own outputs are counted.
- The Async DataLoader reuses its buffers (the loop keeps nothing of a step past it), runs the
  sampler in a worker process (so the data order comes from :class:`SeededEpochSampler`, not
  from the worker's RNG), and only the configured optimizer attributes are passed to
  ``poptorch.optim`` (PopTorch makes every attribute passed explicitly *variable*).
- ``dataset.augment`` happens in that worker too, one combined batch at a time
  (:class:`AugmentingCollate`), seeded by (seed, epoch, batch) as on the CPU/GPU.
- Validation after each epoch uses one inference model, built at the first validation and
  reused (for the test set too); the training executable detaches for it and re-attaches
  at its next step (:meth:`IpuBackend.validating`).
"""
import contextlib
import inspect
import logging
import os
import re
import signal
import threading
from typing import List

import torch
from omegaconf import OmegaConf

from ..data.datasets import Normalise, augment_batch, augmentation_generator, shard_of
from ..errors import UserError
from ..models.octave import build_model, octave_branches
from ..models.spec import OCTAVE_BRANCHES
from . import distributed
from .base import Backend
from .checks import check_ipu_profiling, check_ipu_training, ipus_needed

POPTORCH_INSTALL_HINT = (
    "device=ipu needs PopTorch, which ships with Graphcore's Poplar SDK (it is not on PyPI): "
    "install the SDK, `source <sdk>/enable`, then `pip install <sdk>/poptorch-*.whl` into this "
    "environment; or choose device=cpu, cuda or auto")

OPTIMIZER_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
                     "lamb": "LAMB"}
OUTPUT_MODES = {"final": "Final", "all": "All", "sum": "Sum"}

# poptorch.LAMB exists only in PopTorch: the values its None defaults stand for (poptorch
# 3.4 python/optim.py, LAMB.__init__). The torch optimizers' defaults are read from torch.
LAMB_DEFAULTS = {"betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 1e-2,
                 "bias_correction": True}

log = logging.getLogger("octconv_exp")


def import_poptorch():
    """``import poptorch``, or one line saying why it cannot be used here.

    PopTorch asserts at import that the torch installed is the one it was built for
    (poptorch 3.4 python/__init__.py: ``assert torch.__version__.startswith(...)``, "This
    version of PopTorch only works with torch==X but the version installed is Y"): that is an
    AssertionError, not an ImportError."""
    try:
        import poptorch  # optional: PopTorch exists only in a Poplar SDK environment
    except ImportError:
        raise UserError(POPTORCH_INSTALL_HINT) from None
    except AssertionError as exc:
        raise UserError(f"device=ipu: {poptorch_torch_mismatch(exc)}; or choose device=cpu or "
                        "cuda") from None
    return poptorch


def poptorch_torch_mismatch(exc):
    """What is wrong when ``import poptorch`` fails other than with ImportError (its torch
    pin; any other assert), as part of one line."""
    text = " ".join(str(exc).split())
    wanted = re.search(r"torch==(\S+)", text)
    if wanted:
        return (f"this PopTorch was built for torch=={wanted.group(1)} but torch "
                f"{torch.__version__} is installed; install torch=={wanted.group(1)} in this "
                "environment (pip install -r requirements.txt -c .ci/sdk-3.4.constraints.txt "
                "for SDK 3.3/3.4)")
    return f"PopTorch cannot be imported here ({type(exc).__name__}: {text})"


@contextlib.contextmanager
def stop_signals_held_from_workers():
    """SIGINT and SIGTERM ignored while a PopTorch Async loader starts its worker, so that
    the worker process, the forkserver it is forked from (started by the first loader) and
    their torch DataLoader workers ignore them: an ignored signal stays ignored across fork
    and exec, Python's start-up keeps an ignored SIGINT ignored, and the forkserver hands its
    children the SIGINT handler it started with (CPython multiprocessing/forkserver.py, main
    and _serve_one; it unblocks SIGINT itself, so blocking alone would not do).

    PopTorch's worker catches KeyboardInterrupt and exits with code 0 (poptorch 3.4
    python/_dataloader.py:258-278); the host raises only for a non-zero exit (131-134) and
    otherwise waits for data forever (__init__.py:646-657) or fails to send it a command; a
    SIGTERM kills the worker, which ends the run with "An error occurred in the data
    fetcher". A terminal's Ctrl-C reaches the whole process group: the workers keep loading,
    and the run's own handler stops it at a checkpoint. The signals are also blocked
    meanwhile, so one arriving then is delivered to this process, to its own handler, when
    the mask is restored. The workers are stopped by PopTorch's Shutdown command
    (``terminate()``, in :meth:`IpuBackend.close`)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be changed in the main thread
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class SeededEpochSampler(torch.utils.data.Sampler):
    """A shuffled order per pass, from ``seed`` and the pass number alone.

    PopTorch's Async DataLoader iterates the torch DataLoader in a worker process
    (poptorch 3.4 python/_dataloader.py, AsynchronousDataAccessor), so a plain
    ``shuffle=True`` draws its order from that process's RNG, not from the run's seed. This
    sampler carries only integers, counts its own passes in whichever process iterates it,
    and starts at ``first_epoch`` so a resumed run sees the epochs' orders it would have."""

    def __init__(self, size, seed, first_epoch=1, tagged=False):
        self.size, self.seed, self.epoch = int(size), int(seed), int(first_epoch)
        # tagged: yield (epoch, position in the pass, index) keys for :class:`TaggedSamples`.
        self.tagged = bool(tagged)

    def order(self, epoch):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def __iter__(self):
        epoch = self.epoch
        order = self.order(epoch).tolist()
        self.epoch += 1
        if self.tagged:
            return iter([(epoch, position, index) for position, index in enumerate(order)])
        return iter(order)

    def __len__(self):
        return self.size


class InstanceShardSampler(torch.utils.data.Sampler):
    """PopRun instances: every instance draws the same seeded order (``sampler``) and keeps
    its contiguous share of each global combined batch (``combined`` samples per instance x
    ``instances``), as data-parallel ranks do (``data.shard_of``); the tail that does not fill
    a global batch is dropped, as the training loader drops its last batch. PopTorch's own
    partitioning (auto_distributed_partitioning: contiguous blocks of the whole dataset,
    python/__init__.py:126-211) is turned off for it."""

    def __init__(self, sampler, combined, instance, instances):
        self.sampler, self.combined = sampler, int(combined)
        self.instance, self.instances = int(instance), int(instances)

    def __iter__(self):
        keys = list(iter(self.sampler))
        g = self.combined * self.instances
        out = []
        for start in range(0, len(keys) - g + 1, g):
            part = shard_of(torch.arange(start, start + g), self.instance, self.instances)
            out += [keys[i] for i in part.tolist()]
        return iter(out)

    def __len__(self):
        g = self.combined * self.instances
        return (len(self.sampler) // g) * self.combined


def ipu_model_from_environment():
    """POPTORCH_IPU_MODEL or POPTORCH_SMALL_IPU_MODEL set to a non-zero integer: PopTorch uses
    the IPU Model where the options do not say (popart_compiler/source/CompilerImpl.cpp
    :462-476, Utils.cpp:30-53)."""
    for name in ("POPTORCH_IPU_MODEL", "POPTORCH_SMALL_IPU_MODEL"):
        try:
            if int(os.environ.get(name, "0")) != 0:
                return True
        except ValueError:
            pass
    return False


def popdist_module():
    """Graphcore's popdist when poprun started this process (its environment set), else
    None (graphcore/examples vision/cnns/pytorch/utils/distributed.py: isPopdistEnvSet)."""
    try:
        import popdist  # optional: PopDist exists only in a Poplar SDK environment
    except ImportError:
        return None
    return popdist if popdist.isPopdistEnvSet() else None


class NormalisingCollate:
    """``collate_fn`` of the IPU loaders: stacks a combined batch of uint8 samples and
    normalises it (``data.Normalise``: elementwise, so the same numbers as normalising the
    whole set at once). The data sets stay uint8 because PopTorch pickles the dataset to its
    forkserver worker (poptorch 3.4 python/_dataloader.py:209-228), which puts every tensor
    in shared memory (/dev/shm): float32 would be 4x the bytes (0.75 GB for CIFAR-10, over
    Docker's default 64 MB /dev/shm at loader construction)."""

    def __init__(self, mean, std):
        self.normalise = Normalise(mean, std)

    def __call__(self, samples):
        images = torch.stack([sample[0] for sample in samples])
        labels = torch.stack([torch.as_tensor(sample[1]) for sample in samples])
        return self.normalise(images), labels


class TaggedSamples(torch.utils.data.Dataset):
    """A data set read with the ``(epoch, position, index)`` keys of a tagged
    :class:`SeededEpochSampler`: each sample says where in which pass it stands, so that
    :class:`AugmentingCollate` can seed its batch's augmentation in the loader's worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, position, index = key
        image, label = self.dataset[index]
        return image, label, epoch, position


class AugmentingCollate:
    """``collate_fn`` of the training loader with ``dataset.augment``: stacks a combined batch
    of :class:`TaggedSamples` and augments it as one batch (``data.augment_batch``), with the
    generator of (seed, epoch, combined-batch index), so a run resumed at an epoch
    augments as an uninterrupted one did. Plain integers only: the worker gets a pickled copy
    (a torch.Generator does not pickle on torch 2.0.1)."""

    def __init__(self, seed, combined_batch, mean, std):
        self.seed, self.combined_batch = int(seed), int(combined_batch)
        self.normalise = Normalise(mean, std)  # the samples are uint8 (NormalisingCollate)

    def __call__(self, samples):
        images = self.normalise(torch.stack([sample[0] for sample in samples]))
        labels = torch.stack([torch.as_tensor(sample[1]) for sample in samples])
        epoch, position = int(samples[0][2]), int(samples[0][3])
        generator = augmentation_generator(self.seed, epoch, position // self.combined_batch)
        return augment_batch(images, generator).contiguous(), labels


class TestBatches:
    """PopTorch's test loader (whole combined batches), then the images left over, if any."""

    def __init__(self, loader, tail_images, tail_labels):
        self.loader = loader
        self.tail = (tail_images, tail_labels) if tail_images.shape[0] else None

    def __len__(self):
        return len(self.loader) + (1 if self.tail is not None else 0)

    def __iter__(self):
        yield from self.loader
        if self.tail is not None:
            yield self.tail


class IpuBackend(Backend):
    """PopTorch: a training and an inference executable over the host model. Its training
    loader (poptorch.DataLoader) cannot start a pass part-way: whole epochs are checkpointed
    (``resumes_inside_epoch`` stays False)."""

    name = "ipu"

    def __init__(self, cfg):
        self.cfg = cfg
        check_ipu_training(cfg)  # device=auto reaches here without validate's IPU checks
        self.poptorch = import_poptorch()
        ipu = cfg.ipu
        needed = ipus_needed(cfg)
        if not ipu.use_ipu_model and not ipu_model_from_environment() and \
                not self.poptorch.ipuHardwareIsAvailable(needed):
            raise UserError(f"device=ipu: this run needs {needed} IPU(s) (ipu.replicas) and "
                            f"poptorch.ipuHardwareIsAvailable({needed}) is False; check "
                            "`gc-info -l`, lower ipu.replicas, or set ipu.use_ipu_model=true to "
                            "run on the IPU Model simulator")
        self.popdist = popdist_module()
        self.instance, self.instances = 0, 1
        if self.popdist is not None:
            self.join_poprun()
        self.training_model = None
        self.inference_model = None
        self.loaders = []
        self.optimizer = None
        self.first_epoch = 1
        # What PopTorch raises when the device or compilation fails (poptorch.Error from
        # poptorch_core, with RecoverableError / UnrecoverableError below it).
        self.device_errors = tuple(e for e in (getattr(self.poptorch, "Error", None),)
                                   if isinstance(e, type))
        # enableSyntheticData feeds the inference model too: its accuracy means nothing.
        self.synthetic_data = bool(ipu.synthetic_data)

    def join_poprun(self):
        """Under poprun: the instance layout poprun gives, checked against the config, and
        (several instances) the others joined to combine results."""
        popdist, ipu = self.popdist, self.cfg.ipu
        popdist.init()
        local, total = popdist.getNumLocalReplicas(), popdist.getNumTotalReplicas()
        self.instance, self.instances = popdist.getInstanceIndex(), popdist.getNumInstances()
        if int(ipu.replicas) != local:
            raise UserError(
                f"ipu.replicas={ipu.replicas}: under poprun each instance runs the replicas "
                f"poprun gives it, here {local} ({total} replicas over {self.instances} "
                f"instance(s): poprun --num-replicas {total} --num-instances {self.instances}); "
                f"set ipu.replicas={local}")
        if self.instances > 1:
            distributed.join_poprun(self.instance, self.instances)
        log.info("PopRun: instance %d of %d, %d local replica(s) of %d", self.instance,
                 self.instances, local, total)

    # ---------------------------------------------------------------------------- options

    def make_options(self, train):
        poptorch, cfg, ipu = self.poptorch, self.cfg, self.cfg.ipu
        if self.popdist is not None:
            # Its replication factor (this instance's replicas) and process id are set, and
            # may not be set again (graphcore/examples vision/cnns/pytorch/train/train.py
            # :291-299; poptorch tests/popdist_test.py:15-41).
            import popdist.poptorch

            opts = popdist.poptorch.Options(ipus_per_replica=1)
        else:
            opts = poptorch.Options()
            opts.replicationFactor(ipu.replicas)
        opts.deviceIterations(ipu.device_iterations)
        if train:
            # Inference models refuse gradient accumulation.
            opts.Training.gradientAccumulation(ipu.gradient_accumulation)
            if ipu.replicas > 1 and hasattr(opts, "broadcastBuffers"):
                # BatchNorm updates its running statistics in place, which a replicated graph
                # cannot do while buffers are broadcast from replica 0 (PopTorch
                # InplaceOps.cpp: "does not support broadcasting buffers"): each replica keeps
                # its own statistics, and the host copy is replica 0's.
                opts.broadcastBuffers(False)
            if ipu.output_mode != "default":
                opts.outputMode(getattr(poptorch.OutputMode, OUTPUT_MODES[ipu.output_mode]))
        else:
            opts.outputMode(poptorch.OutputMode.All)  # every test image's prediction
        # Options.randomSeed also calls torch.manual_seed (poptorch 3.4 python/options.py,
        # randomSeed): keep the host's RNG stream where the run left it (the model is built).
        host_rng = torch.get_rng_state()
        opts.randomSeed(int(cfg.seed))
        torch.set_rng_state(host_rng)
        if ipu.cache_dir is not None:
            # Separate caches for the training and the inference executable, as the seed did.
            suffix = "train" if train else "inference"
            opts.enableExecutableCaching(os.path.join(ipu.cache_dir, f"{cfg.conv.mode}-{suffix}"))
        if ipu.use_ipu_model:
            # Only when asked: useIpuModel(False) would override POPTORCH_IPU_MODEL=1 (options.py
            # :1567-1581, "takes precedence over the POPTORCH_IPU_MODEL environment variable").
            opts.useIpuModel(True)
        if ipu.available_memory_proportion is not None:
            opts.setAvailableMemoryProportion({"IPU0": float(ipu.available_memory_proportion)})
        if ipu.synthetic_data:
            opts.enableSyntheticData(True)
        return opts

    def combined_batch(self, batch_size, train):
        ipu = self.cfg.ipu
        accumulation = ipu.gradient_accumulation if train else 1
        return batch_size * ipu.device_iterations * ipu.replicas * accumulation

    # ---------------------------------------------------------------------------- model

    def multi_conv_scope(self, conv):
        """A configured ``poptorch.MultiConv`` for one octave layer.

        Per-convolution options given per branch [h2h, h2l, l2l, l2h] are narrowed to the
        branches this layer has, in the order octconv runs them."""
        poptorch = self.poptorch
        mc = self.cfg.conv.multi_conv
        branches = octave_branches(conv)

        def per_conv(values):
            values = list(values)
            if len(values) == 1:
                return values[0]
            return [values[OCTAVE_BRANCHES.index(b)] for b in branches]

        scope = poptorch.MultiConv()
        scope.planType(getattr(poptorch.MultiConvPlanType, mc.plan_type.capitalize()))
        if mc.available_memory_proportions is not None:
            scope.availableMemoryProportions(per_conv([float(v) for v in mc.available_memory_proportions]))
        if mc.partials_types is not None:
            dtypes = {"float": torch.float, "half": torch.half}
            scope.partialsTypes(per_conv([dtypes[v] for v in mc.partials_types]))
        if mc.per_conv_reserved_tiles is not None:
            scope.perConvReservedTiles(int(mc.per_conv_reserved_tiles))
        if mc.cycle_back_off is not None:
            scope.cycleBackOff(float(mc.cycle_back_off))
        return scope

    def build_model(self, num_classes):
        scope = self.multi_conv_scope if self.cfg.conv.mode == "multi-octave" else None
        return build_model(self.cfg, num_classes=num_classes, parallel_scope=scope)

    def optimizer_kwargs(self):
        """The optimizer group as ``poptorch.optim`` keyword arguments: ``lr`` and only the
        attributes that differ from the optimizer's defaults.

        PopTorch marks every attribute passed explicitly as *variable* (poptorch 3.4
        python/optim.py ``_parseArgs``: "Attributes explicitly set by the user are considered
        variable"), and one not given is constant: for a ``poptorch.optim`` optimizer the
        const-ness is ``variable_attrs.isConstant(name)`` (python/_optimizer_attributes.py
        :413-419, optim.py:29-31), not the value tests of torch optimizers (``_IsEqualTo``). A variable momentum, even 0, makes
        PopART use SGD2 (velocity and accumulator tensors per weight; PopART sgd.cpp), where
        the seed's ``torch.optim.SGD(lr=...)`` compiles to the plain SGD0. Passing only what
        differs keeps the default config compiling to the seed's."""
        node = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        name = node.pop("name")
        node.pop("_target_", None)
        if name == "lamb":
            defaults = LAMB_DEFAULTS
        else:
            torch_cls = getattr(torch.optim, OPTIMIZER_CLASSES[name])
            defaults = {k: p.default for k, p in inspect.signature(torch_cls).parameters.items()
                        if p.default is not inspect.Parameter.empty}
        kwargs = {}
        for key, value in node.items():
            if isinstance(value, list):
                value = tuple(value)
            if value is None or (key != "lr" and key in defaults and _same(value, defaults[key])):
                continue
            kwargs[key] = value
        if self.cfg.ipu.loss_scaling is not None:
            kwargs["loss_scaling"] = float(self.cfg.ipu.loss_scaling)
        return name, kwargs

    def build_optimizer(self, model):
        """The optimizer group mapped onto ``poptorch.optim`` (which adds loss scaling)."""
        name, kwargs = self.optimizer_kwargs()
        cls = getattr(self.poptorch.optim, OPTIMIZER_CLASSES[name])
        self.optimizer = cls(model.parameters(), **kwargs)
        return self.optimizer

    # ---------------------------------------------------------------------------- data

    def make_loaders(self, data, train=True):
        """PopTorch loaders for training (None with ``train=False``: no worker is started) and
        for the test set."""
        poptorch, cfg = self.poptorch, self.cfg
        t, ipu = cfg.trainer, cfg.ipu
        train_loader = None
        loaders: List = []
        if train:
            combined = self.combined_batch(t.batch_size, True)
            if len(data.train) < combined * self.instances:
                # Checked here: PopTorch's Async loader fails on it at construction, less clearly.
                held = ("" if data.val is None else
                        f", after dataset.val_size held out {len(data.val)}")
                raise UserError(
                    f"the training set ({len(data.train)} images{held}) is smaller than one "
                    f"combined batch ({combined * self.instances} = trainer.batch_size x "
                    "ipu.device_iterations x ipu.replicas x ipu.gradient_accumulation"
                    + (f" x {self.instances} PopRun instances" if self.instances > 1 else "")
                    + "); lower them"
                    + ("" if data.val is None else " or dataset.val_size"))
            train_ds = torch.utils.data.TensorDataset(data.train.images, data.train.labels)
            extra = {"collate_fn": NormalisingCollate(data.mean, data.std)}
            self.train_options = self.make_options(train=True)
            augment = bool(cfg.dataset.get("augment", False))
            # The order comes from the run's seed in whichever process iterates the sampler;
            # so does the augmentation, batch by batch, in the loader's worker.
            sampler = SeededEpochSampler(len(train_ds), cfg.seed, self.first_epoch,
                                         tagged=augment)
            if self.popdist is not None:  # this instance's share; not PopTorch's partitions
                extra["auto_distributed_partitioning"] = False
                if self.instances > 1:
                    sampler = InstanceShardSampler(sampler, combined, self.instance,
                                                   self.instances)
            if augment:
                train_ds = TaggedSamples(train_ds)
                extra["collate_fn"] = AugmentingCollate(cfg.seed, combined, data.mean, data.std)
            # drop_last=False would hand the compiled model a smaller last batch (validation
            # refuses it for device=ipu).
            with stop_signals_held_from_workers():
                train_loader = poptorch.DataLoader(self.train_options, train_ds,
                                                   batch_size=t.batch_size, shuffle=False,
                                                   sampler=sampler, drop_last=True,
                                                   num_workers=ipu.num_workers,
                                                   mode=poptorch.DataLoaderMode.Async, **extra)
            loaders.append(train_loader)
        self.test_options = self.make_options(train=False)
        test = self.inference_batches(data.test.part(self.instance, self.instances), data)
        self.loaders = loaders + self.loaders
        return train_loader, test

    def make_val_loader(self, data):
        """The validation split, read as the test set is (None without one)."""
        if data.val is None:
            return None
        if getattr(self, "test_options", None) is None:
            self.test_options = self.make_options(train=False)
        return self.inference_batches(data.val.part(self.instance, self.instances), data)

    def inference_batches(self, images, data):
        """An :class:`ImageSet` for the inference model: whole combined batches through
        PopTorch's loader, then the rest (padded at inference)."""
        poptorch, t, ipu = self.poptorch, self.cfg.trainer, self.cfg.ipu
        ds = torch.utils.data.TensorDataset(images.images, images.labels)
        collate = NormalisingCollate(data.mean, data.std)
        combined = self.combined_batch(t.test_batch_size, train=False)
        full = (len(ds) // combined) * combined
        loader = []
        if full:
            extra = {"collate_fn": collate}
            if self.popdist is not None:
                extra["auto_distributed_partitioning"] = False
            with stop_signals_held_from_workers():
                loader = poptorch.DataLoader(
                    self.test_options, torch.utils.data.Subset(ds, range(full)),
                    batch_size=t.test_batch_size, shuffle=False, drop_last=True,
                    num_workers=ipu.num_workers, mode=poptorch.DataLoaderMode.Async, **extra)
            self.loaders.append(loader)
        return TestBatches(loader, collate.normalise(ds.tensors[0][full:]), ds.tensors[1][full:])

    def start_at_epoch(self, epoch):
        """resume=true: the loader's order continues at ``epoch`` (before make_loaders)."""
        self.first_epoch = int(epoch)

    # ---------------------------------------------------------------------------- steps

    def training_step(self, model, optimizer):
        poptorch = self.poptorch
        model.train()  # PopTorch copies the model's mode when it wraps it
        if self.training_model is None:
            self.training_model = poptorch.trainingModel(model, self.train_options, optimizer)
        training_model = self.training_model
        ipu = self.cfg.ipu
        iterations = ipu.device_iterations * ipu.gradient_accumulation

        def step(images, labels):
            output, loss = training_model(images, labels)
            if self.synthetic_data:
                return None, loss  # computed on device-side data: nothing to score
            if ipu.output_mode == "sum":
                # Summed over the device iterations: no per-image predictions to score.
                return None, loss.detach().float() / iterations
            return output, loss

        return step

    def on_epoch_end(self, optimizer):
        """A learning-rate schedule changed the optimizer on the host: send it to the IPU."""
        if self.training_model is not None:
            self.training_model.setOptimizer(optimizer)

    def sync_to_host(self, model):
        """Checkpoints read the model on the host: bring the IPU's weights back first. A
        training executable detached for validation brought them back when it detached
        (poptorch 3.4 python/_poplar_executor.py:1553-1569, detachFromDevice), and reading
        weights from a detached executable would reload its engine onto a device it no
        longer holds (PopART willow/src/popx/devicex.cpp:241-250)."""
        tm = self.training_model
        if tm is not None and tm.isCompiled() and tm.isAttachedToDevice():
            tm.copyWeightsToHost()

    def finish_training(self, model):
        # A model that never compiled (resume=true on a finished run) has no executable:
        # copyWeightsToHost would raise NO_EXECUTABLE_ERR (poptorch 3.4
        # python/_poplar_executor.py, copyWeightsToHost). One detached for the last
        # validation already holds nothing the host lacks (see sync_to_host).
        tm = self.training_model
        if tm is None or not tm.isCompiled() or not tm.isAttachedToDevice():
            return
        tm.copyWeightsToHost()
        tm.detachFromDevice()  # free the IPUs for the inference model

    @contextlib.contextmanager
    def validating(self, model):
        """A validation pass between two training epochs, as PopTorch's own test of it does
        (poptorch 3.4 tests/attach_detach_test.py, test_attach_detach_accuracy): the
        training executable detaches, which copies its weights and optimizer state to the
        host (_poplar_executor.py:1553-1569) and frees its IPUs; the inference model (built
        at the first validation, then reused) attaches, and since the host's weights are
        newer than its own it copies them to its device before running
        (_poplar_executor.py:1250-1262, _host_weights_version); it detaches after the pass,
        and the training executable attaches again at its next step (__call__, 1243-1244),
        writing the weights and the optimizer state back (_on_device_attach, 414-432).
        Machines with IPUs for only one of them need this; with the IPU Model it costs
        nothing."""
        tm = self.training_model
        if tm is not None and tm.isAttachedToDevice():
            tm.detachFromDevice()
        infer = self.inference_step(model)
        try:
            yield infer
        finally:
            im = self.inference_model
            if im is not None and im.isAttachedToDevice():
                im.detachFromDevice()
            model.train()

    def inference_step(self, model):
        """The inference model (one per backend: built at the first call with the model in
        eval mode, then reused for validation and the test set: the same Options and batch
        shape, so one executable)."""
        model.eval()
        if self.inference_model is None:
            self.inference_model = self.poptorch.inferenceModel(model, self.test_options)
        inference_model = self.inference_model
        combined = self.combined_batch(self.cfg.trainer.test_batch_size, train=False)

        def infer(images):
            n = images.shape[0]
            if n == combined:
                return inference_model(images)
            # The compiled executable only takes whole combined batches: pad the tail with
            # copies of its first image and keep only the tail's own predictions.
            pad = images[:1].expand(combined - n, *images.shape[1:])
            return inference_model(torch.cat([images, pad]))[:n]

        return infer

    def close(self):
        for loader in self.loaders:
            terminate = getattr(loader, "terminate", None)
            if callable(terminate):
                terminate()
        for executor in (self.inference_model, self.training_model):
            if executor is not None and executor.isAttachedToDevice():
                executor.detachFromDevice()

    # ---------------------------------------------------------------------------- profiling

    def profile(self, model, optimizer, profile_dir, image_shape, num_classes):
        """The seed's profiling: Poplar's autoReport into profile_dir, synthetic data, one
        training iteration, compiled for the data's ``image_shape`` (C, H, W) and
        ``num_classes``.

        Through ``Options.enableProfiling`` (SDK 3.3 and 3.4: python/options.py:1797-1840),
        which also sets ``debug.allowOutOfMemory`` (1836: a graph that does not fit still
        compiles and is reported) and leaves ``POPLAR_ENGINE_OPTIONS`` to the user (its values
        win in Poplar; PopTorch warns, 1825-1833)."""
        check_ipu_profiling(self.cfg)
        os.makedirs(profile_dir, exist_ok=True)
        directory = os.path.abspath(profile_dir)
        self.train_options = self.make_options(train=True)
        self.train_options.enableProfiling(directory)
        self.train_options.enableSyntheticData(True)
        step = self.training_step(model, optimizer)
        n = self.combined_batch(self.cfg.trainer.batch_size, train=True)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(n, *image_shape, generator=gen)
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        step(images, labels)
        return [directory]


def _same(value, default):
    """``value`` equals the optimizer's ``default`` (False is not 0, 1 is 1.0)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default) and value == default
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return float(value) == float(default)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return len(value) == len(default) and all(_same(a, b) for a, b in zip(value, default))
    return False
