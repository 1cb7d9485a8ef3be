"""octconv-exp benchmark: can the streaming image-folder loader keep up with training?

    .venv/bin/python bench/bench_streaming.py

Writes a temporary folder of 32x32 PNGs (10 classes x 300 training images by default, removed
afterwards) and measures, in one process:

* the images per second :class:`octconv_exp.data.streaming.StreamingLoader` delivers alone (2 worker
  processes, shuffled, batch 64, CPU): one whole pass after a warm-up pass;
* the images per second the default seed model (conv=vanilla) trains at, batch 64, SGD, on a
  fixed batch: warm-up steps, then timed steps;
* for context: the loader alone with one torch thread in the main process, and one training
  pass fed by the streaming loader against one fed by the in-memory BatchLoader over the same
  decoded images (on a 2-core machine the workers and the training step share the cores).

Loader and training are measured round-robin over a few repeats and the median kept, so a slow
patch of a shared machine hits both alike. It prints ratios measured in one run (compare
numbers from the same run only) and PASS/FAIL against the target loader / training >= 1.0,
and exits 0 either way: it is a measurement, not a test.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from octconv_exp.data.datasets import BatchLoader  # noqa: E402
from octconv_exp.data.loading import load_image_folder  # noqa: E402
from octconv_exp.models.octave import build_model  # noqa: E402  (imports the config schema too)
from octconv_exp.data.streaming import StreamingLoader, scan_image_folder  # noqa: E402

TARGET = 1.0  # loader images/s / training images/s
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def write_folder(root, classes, per_class, size=32, seed=0):
    """root/train/<class>/<i>.png: smooth random images (so PNG compresses as photos do)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    for k in range(classes):
        d = os.path.join(root, "train", f"class{k:02d}")
        os.makedirs(d)
        for i in range(per_class):
            small = rng.randint(0, 256, size=(size // 4, size // 4, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
            noise = rng.randint(-8, 9, size=(size, size, 3))
            arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(d, f"{i:04d}.png"))
    return os.path.join(root, "train")


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=conf):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def memory_format_of(cfg):
    """speed.channels_last on the CPU (auto: on, as the native backend decides)."""
    setting = str(cfg.speed.channels_last).lower()
    return torch.channels_last if setting in ("auto", "true") else torch.contiguous_format


def make_trainer(cfg, memory_format):
    """A training step of the config's model and optimizer (plain SGD for the default)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10).to(memory_format=memory_format)
    node = OmegaConf.to_container(cfg.optimizer, resolve=True)
    node.pop("name", None)
    opt = instantiate(node, params=model.parameters())
    model.train()

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args(argv)

    cfg = compose("conv=vanilla", f"trainer.batch_size={args.batch}")
    fmt = memory_format_of(cfg)
    tmp = tempfile.mkdtemp(prefix="bench_streaming_")
    try:
        t = time.perf_counter()
        folder = write_folder(tmp, args.classes, args.per_class)
        files = scan_image_folder(folder)
        n = len(files)
        print(f"octconv-exp streaming benchmark — torch {torch.__version__} — "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} cores — {n} PNGs 32x32 "
              f"written in {time.perf_counter() - t:.1f} s")

        loader = StreamingLoader(files, args.batch, MEAN, STD, shuffle=True, drop_last=True,
                                 seed=0, memory_format=fmt, workers=args.workers)
        step = make_trainer(cfg, fmt)
        g = torch.Generator().manual_seed(0)
        xb = torch.randn(args.batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
        yb = torch.randint(0, 10, (args.batch,), generator=g)

        def loader_pass():
            t0, images = time.perf_counter(), 0
            for x, _ in loader:
                images += x.shape[0]
            return images / (time.perf_counter() - t0)

        def training():
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                step(xb, yb)
            return args.train_steps * args.batch / (time.perf_counter() - t0)

        loader_pass()  # warm-up: starts the worker pool, fills the page cache
        for _ in range(5):
            step(xb, yb)
        loader_rates, train_rates = [], []
        for _ in range(args.repeats):
            loader_rates.append(loader_pass())
            train_rates.append(training())
        loader_rate, train_rate = statistics.median(loader_rates), statistics.median(train_rates)
        ratio = loader_rate / train_rate
        # Context: the same with one torch thread in this process (its intra-op threads and
        # the workers otherwise oversubscribe a small machine's cores).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_thread = statistics.median(loader_pass() for _ in range(2))
        finally:
            torch.set_num_threads(threads)

        # Context: one training pass fed by each loader (the cores shared with the workers).
        data = load_image_folder(folder)
        memory = BatchLoader(data, args.batch, MEAN, STD, shuffle=True, drop_last=True, seed=0,
                             memory_format=fmt)

        def fed_pass(source):
            t0, images = time.perf_counter(), 0
            for x, y in source:
                step(x, y)
                images += x.shape[0]
            return images / (time.perf_counter() - t0)

        fed_stream, fed_memory = fed_pass(loader), fed_pass(memory)
        loader.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"loader alone ({args.workers} workers, batch {args.batch}, shuffled): "
          f"{loader_rate:.0f} img/s (median of {args.repeats} passes: "
          f"{', '.join(f'{r:.0f}' for r in loader_rates)})")
    print(f"loader alone, 1 torch thread in the main process: {one_thread:.0f} img/s")
    print(f"training (seed model, conv=vanilla, batch {args.batch}, SGD, fixed batch): "
          f"{train_rate:.0f} img/s (median of {args.repeats}: "
          f"{', '.join(f'{r:.0f}' for r in train_rates)})")
    print(f"training pass fed by the streaming loader: {fed_stream:.0f} img/s; by the in-memory "
          f"BatchLoader: {fed_memory:.0f} img/s ({fed_stream / fed_memory:.2f}x)")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"[{verdict}] loader / training = {ratio:.2f} (target >= {TARGET:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
