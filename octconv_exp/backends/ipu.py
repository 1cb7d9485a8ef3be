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
"""
import json
import os
from typing import List

import torch
from omegaconf import OmegaConf

from ..data import Normalise
from ..config import OCTAVE_BRANCHES, check_ipu_profiling
from ..errors import UserError
from ..model import build_model, octave_branches

POPTORCH_INSTALL_HINT = (
    "device=ipu needs PopTorch, which ships with Graphcore's Poplar SDK (it is not on PyPI): "
    "install the SDK, `source <sdk>/enable`, then `pip install <sdk>/poptorch-*.whl` into this "
    "environment; or choose device=cpu, cuda or auto")

OPTIMIZER_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
                     "lamb": "LAMB"}
OUTPUT_MODES = {"final": "Final", "all": "All", "sum": "Sum"}


def import_poptorch():
    try:
        import poptorch
    except ImportError:
        raise UserError(POPTORCH_INSTALL_HINT) from None
    return poptorch


def normalised_tensor_dataset(images, labels, mean, std, chunk=8192):
    """The whole data set normalised once (in chunks, to bound the temporaries), so PopTorch's
    DataLoader workers only index tensors."""
    normalise = Normalise(mean, std)
    out = torch.empty(images.shape, dtype=torch.float32)
    for start in range(0, images.shape[0], chunk):
        out[start:start + chunk] = normalise(images[start:start + chunk])
    return torch.utils.data.TensorDataset(out, labels)


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


class IpuBackend:
    name = "ipu"

    def __init__(self, cfg):
        self.cfg = cfg
        self.poptorch = import_poptorch()
        ipu = cfg.ipu
        if not ipu.use_ipu_model and not self.poptorch.ipuHardwareIsAvailable():
            raise UserError("device=ipu: no IPU is available here (poptorch.ipuHardwareIsAvailable() "
                            "is False); check `gc-info -l`, or set ipu.use_ipu_model=true to run on "
                            "the IPU Model simulator")
        self.training_model = None
        self.inference_model = None
        self.loaders = []
        self.optimizer = None

    # ---------------------------------------------------------------------------- options

    def make_options(self, train):
        poptorch, cfg, ipu = self.poptorch, self.cfg, self.cfg.ipu
        opts = poptorch.Options()
        opts.deviceIterations(ipu.device_iterations)
        opts.replicationFactor(ipu.replicas)
        if train:
            # Inference models refuse gradient accumulation.
            opts.Training.gradientAccumulation(ipu.gradient_accumulation)
            if ipu.output_mode != "default":
                opts.outputMode(getattr(poptorch.OutputMode, OUTPUT_MODES[ipu.output_mode]))
        else:
            opts.outputMode(poptorch.OutputMode.All)  # every test image's prediction
        opts.randomSeed(int(cfg.seed))
        if ipu.cache_dir is not None:
            # Separate caches for the training and the inference executable, as the seed did.
            suffix = "train" if train else "inference"
            opts.enableExecutableCaching(os.path.join(ipu.cache_dir, f"{cfg.conv.mode}-{suffix}"))
        opts.useIpuModel(bool(ipu.use_ipu_model))
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

    def build_optimizer(self, model):
        """The optimizer group mapped onto ``poptorch.optim`` (which adds loss scaling)."""
        node = OmegaConf.to_container(self.cfg.optimizer, resolve=True)
        name = node.pop("name")
        node.pop("_target_", None)
        for key in ("betas",):
            if key in node and node[key] is not None:
                node[key] = tuple(node[key])
        if self.cfg.ipu.loss_scaling is not None:
            node["loss_scaling"] = float(self.cfg.ipu.loss_scaling)
        cls = getattr(self.poptorch.optim, OPTIMIZER_CLASSES[name])
        self.optimizer = cls(model.parameters(), **node)
        return self.optimizer

    # ---------------------------------------------------------------------------- data

    def make_loaders(self, data):
        poptorch, cfg = self.poptorch, self.cfg
        t, ipu = cfg.trainer, cfg.ipu
        train_ds = normalised_tensor_dataset(data.train.images, data.train.labels, data.mean,
                                             data.std)
        test_ds = normalised_tensor_dataset(data.test.images, data.test.labels, data.mean, data.std)
        self.train_options = self.make_options(train=True)
        self.test_options = self.make_options(train=False)
        train = poptorch.DataLoader(self.train_options, train_ds, batch_size=t.batch_size,
                                    shuffle=True, drop_last=True, num_workers=ipu.num_workers,
                                    mode=poptorch.DataLoaderMode.Async)
        if len(train) == 0:
            raise UserError(
                f"the training set ({len(train_ds)} images) is smaller than one combined batch "
                f"({self.combined_batch(t.batch_size, True)} = trainer.batch_size x "
                "ipu.device_iterations x ipu.replicas x ipu.gradient_accumulation); lower them")
        # Whole combined batches through PopTorch's loader; the rest is padded at inference.
        combined = self.combined_batch(t.test_batch_size, train=False)
        full = (len(test_ds) // combined) * combined
        loaders: List = []
        if full:
            loaders.append(poptorch.DataLoader(
                self.test_options, torch.utils.data.Subset(test_ds, range(full)),
                batch_size=t.test_batch_size, shuffle=False, drop_last=True,
                num_workers=ipu.num_workers, mode=poptorch.DataLoaderMode.Async))
        tail_x, tail_y = test_ds.tensors[0][full:], test_ds.tensors[1][full:]
        test = TestBatches(loaders[0] if loaders else [], tail_x, tail_y)
        self.loaders = [train] + loaders
        return train, test

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
        """Checkpoints read the model on the host: bring the IPU's weights back first."""
        if self.training_model is not None and self.training_model.isCompiled():
            self.training_model.copyWeightsToHost()

    def finish_training(self, model):
        if self.training_model is None:
            return
        self.training_model.copyWeightsToHost()
        if self.training_model.isAttachedToDevice():
            self.training_model.detachFromDevice()  # free the IPUs for the inference model

    def inference_step(self, model):
        model.eval()
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

    def profile(self, model, optimizer, profile_dir):
        """The seed's profiling: Poplar's autoReport into profile_dir, synthetic data, one
        training iteration."""
        check_ipu_profiling(self.cfg)
        os.makedirs(profile_dir, exist_ok=True)
        engine = {"autoReport.all": "true", "autoReport.directory": os.path.abspath(profile_dir),
                  "profiler.format": "v3"}
        os.environ["POPLAR_ENGINE_OPTIONS"] = json.dumps(engine)
        self.train_options = self.make_options(train=True)
        self.train_options.enableSyntheticData(True)
        step = self.training_step(model, optimizer)
        n = self.combined_batch(self.cfg.trainer.batch_size, train=True)
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, 32, 32, generator=gen)
        labels = torch.randint(0, model.fc.out_features, (n,), generator=gen)
        step(images, labels)
        return [os.path.abspath(profile_dir)]
