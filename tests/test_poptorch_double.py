"""The poptorch test double (tests/poptorch_double) models PopTorch 3.4's behaviour, not just its
signatures. Each test names the PopTorch source it checks the double against (graphcore/poptorch
at tag sdk/poptorch/3.4.0, python/ unless said otherwise). Fast: no run.py, one subprocess."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DOUBLE


def dataset(n=20):
    return torch.utils.data.TensorDataset(torch.arange(n).float().unsqueeze(1), torch.arange(n))


class Classifier(torch.nn.Module):
    def __init__(self, batch_norm=False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 3)
        self.bn = torch.nn.BatchNorm1d(3) if batch_norm else torch.nn.Identity()

    def forward(self, x, labels):
        out = torch.log_softmax(self.bn(self.lin(x)), dim=1)
        return out, torch.nn.functional.nll_loss(out, labels)


def batch(n):
    return torch.randn(n, 2), torch.randint(0, 3, (n,))


# ------------------------------------------------------------------------------ import


@pytest.mark.parametrize("pinned, fails", [("1.13.1", True), (None, False), ("same", False)])
def test_import_asserts_the_torch_it_was_built_for(pinned, fails):
    """__init__.py:20-23."""
    env = dict(os.environ, PYTHONPATH=DOUBLE)
    env.pop("POPTORCH_DOUBLE_TORCH_VERSION", None)
    env.pop("RDMAV_FORK_SAFE", None)
    if pinned is not None:
        env["POPTORCH_DOUBLE_TORCH_VERSION"] = (torch.__version__.split("+")[0]
                                                if pinned == "same" else pinned)
    code = "import os, poptorch; print(os.environ['RDMAV_FORK_SAFE'])"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    if fails:
        assert res.returncode != 0
        assert ("AssertionError: This version of PopTorch only works with torch==1.13.1 but "
                f"the version installed is {torch.__version__}") in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "1"  # __init__.py:29-30


# ------------------------------------------------------------------------------ enums


def test_enums_have_the_real_values(poptorch):
    """enums.py:65-78 and the others."""
    assert [(m.name, m.value) for m in poptorch.OutputMode] == [
        ("Final", 0), ("EveryN", 1), ("All", 2), ("Sum", 3), ("Default", 4)]
    assert [m.value for m in poptorch.DataLoaderMode] == [0, 1, 2]
    assert [(m.name, m.value) for m in poptorch.SharingStrategy] == [
        ("SharedMemory", 0), ("FileSystem", 1), ("Fork", 2), ("ForkServer", 3)]
    assert [m.value for m in poptorch.MultiConvPlanType] == [0, 1]
    assert [m.value for m in poptorch.ConnectionType] == [0, 1, 2]
    assert poptorch.VariableRetrievalMode.AllReplicas == 2
    assert not hasattr(poptorch, "SyntheticDataMode")  # popart's enum, not poptorch's
    opts = poptorch.Options().outputMode(poptorch.OutputMode.Sum)
    assert opts.output_mode == 3 and type(opts.output_mode) is int  # stored as .value


# ------------------------------------------------------------------------------ options


def test_options_are_frozen_once_used_and_type_checked(poptorch):
    """_options_impl.py:70-80, 121-125, 143-163; options.py:1895-1898."""
    opts = poptorch.Options()
    with pytest.raises(AssertionError, match="Unexpected type"):
        opts.deviceIterations("2")
    opts.device_iterations = 2  # a public attribute is a type-checked set()
    assert opts.device_iterations == 2
    with pytest.raises(AttributeError, match="Invalid attribute anchorMode"):
        opts.anchorMode(poptorch.OutputMode.All)  # removed from PopTorch
    poptorch.DataLoader(opts, dataset(), batch_size=2)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts.deviceIterations(3)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts._Popart.set("x", 1)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts.Training.gradientAccumulation(2)
    clone = opts.clone()
    clone.deviceIterations(3).Training.gradientAccumulation(2)
    assert (clone.device_iterations, opts.device_iterations) == (3, 2)


def test_random_seed_reseeds_the_host(poptorch):
    """options.py:1747: randomSeed calls torch.manual_seed."""
    torch.manual_seed(99)
    poptorch.Options().randomSeed(7)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


def test_options_read_the_environment(poptorch, monkeypatch):
    """options.py:1193-1198 (POPTORCH_CACHE_DIR, POPTORCH_DEFAULT_OPTIONS), 466 (OMPI)."""
    monkeypatch.setenv("POPTORCH_CACHE_DIR", "/tmp/cache")
    monkeypatch.setenv("POPTORCH_DEFAULT_OPTIONS", '{"deviceIterations": 5}')
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    opts = poptorch.Options()
    assert opts._Popart.options["cachePath"] == "/tmp/cache"
    assert opts.device_iterations == 5
    assert (opts.Distributed.numProcesses, opts.Distributed.processId) == (4, 1)


def test_enable_profiling(poptorch, monkeypatch):
    """options.py:1797-1840: engineOptions, the environment variable untouched."""
    monkeypatch.setenv("POPLAR_ENGINE_OPTIONS", '{"autoReport.all": "false"}')
    opts = poptorch.Options()
    opts._Popart.setEngineOptions({"debug.x": "1"})
    opts.enableProfiling("/p")
    assert opts._Popart.options["engineOptions"] == {
        "debug.x": "1", "debug.allowOutOfMemory": "true", "autoReport.directory": "/p",
        "autoReport.all": "true"}
    assert os.environ["POPLAR_ENGINE_OPTIONS"] == '{"autoReport.all": "false"}'
    assert any("POPLAR_ENGINE_OPTIONS" in e for e in poptorch.LOG["events"])
    assert poptorch.Options().enableProfiling()._Popart.options["engineOptions"][
        "autoReport.directory"] == "."


def test_ipu_hardware_is_available(poptorch, monkeypatch):
    """__init__.py:749-757; popart_compiler/source/Utils.cpp:117-126."""
    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "4")
    assert poptorch.ipuHardwareIsAvailable() and poptorch.ipuHardwareIsAvailable(4)
    assert not poptorch.ipuHardwareIsAvailable(8) and not poptorch.ipuHardwareIsAvailable(3)
    monkeypatch.setenv("POPTORCH_IPU_MODEL", "1")
    assert not poptorch.ipuHardwareIsAvailable()
    assert poptorch.LOG["events"][:4] == ["ipuHardwareIsAvailable(1)",
                                          "ipuHardwareIsAvailable(4)",
                                          "ipuHardwareIsAvailable(8)",
                                          "ipuHardwareIsAvailable(3)"]


# ------------------------------------------------------------------------------ data


def test_async_loader_overwrites_a_batch_one_next_later(poptorch):
    """__init__.py:646-657 (release before acquire), _dataloader.py:381-387, 547-555."""
    opts = poptorch.Options().deviceIterations(2)
    loader = poptorch.DataLoader(opts, dataset(), batch_size=2,
                                 mode=poptorch.DataLoaderMode.Async)
    it = iter(loader)
    images, labels = next(it)
    assert labels.tolist() == [0, 1, 2, 3]
    slot = labels
    _, second = next(it)  # slot 0 released and refilled with batch 3 (buffer_size 3)
    assert second.tolist() == [4, 5, 6, 7]
    assert slot.tolist() == [12, 13, 14, 15]
    next(it)
    _, fourth = next(it)
    assert fourth is slot  # the same tensor object handed out again
    # A clone survives, as batching.rst's warning says.
    keep = [b[1].clone() for b in loader]
    assert torch.cat(keep).tolist() == list(range(20))


def test_sync_loader_returns_fresh_tensors(poptorch):
    loader = poptorch.DataLoader(poptorch.Options(), dataset(), batch_size=4)
    batches = [labels for _, labels in loader]
    assert torch.cat(batches).tolist() == list(range(20))


def test_async_buffer_size_one_overwrites_at_once(poptorch):
    loader = poptorch.DataLoader(poptorch.Options(), dataset(8), batch_size=2,
                                 mode=poptorch.DataLoaderMode.Async,
                                 async_options={"buffer_size": 1})
    it = iter(loader)
    first = next(it)[1]
    assert next(it)[1] is first and first.tolist() == [2, 3]


def test_async_drop_last_false_is_rebatched(poptorch):
    """__init__.py:432-448 (since SDK 3.2), 468-480; _dataloader.py:496-503, 101-110."""
    opts = poptorch.Options().deviceIterations(2)
    loader = poptorch.DataLoader(opts, dataset(), batch_size=3, drop_last=False,
                                 mode=poptorch.DataLoaderMode.Async)
    assert loader.combinedBatchSize == 6 and len(loader) == 4
    for _ in range(2):  # and again in the next epoch
        shapes, labels = [], []
        for x, y in loader:
            shapes.append(tuple(x.shape))
            labels += y.tolist()
        assert shapes == [(6, 1), (6, 1), (6, 1), (2, 1)] and labels == list(range(20))
    # The last, short, batch is a view of a ring-buffer slot (narrow) ...
    views = list(loader)
    assert all(y._base is not None for _, y in views)
    # ... and keeping the batches without cloning them keeps what the slots hold now: the
    # worker has already prefetched the next epoch into them.
    assert [y.tolist() for _, y in views] != [y.tolist() for _, y in loader]


def test_async_with_an_empty_dataset_fails_at_construction(poptorch):
    """_dataloader.py:302-306 (worker) and 251-256 (parent)."""
    with pytest.raises(poptorch.Error, match="worker thread failed to start"):
        poptorch.DataLoader(poptorch.Options().deviceIterations(8), dataset(10), batch_size=2,
                            mode=poptorch.DataLoaderMode.Async)


def _epoch_order(poptorch, **kwargs):
    loader = poptorch.DataLoader(poptorch.Options(), dataset(), batch_size=5, shuffle=True,
                                 **kwargs)
    return [label for _, labels in loader for label in labels.tolist()]


def test_async_shuffle_ignores_the_parents_seed(poptorch, monkeypatch):
    """The sampler runs in the worker process (forkserver by default, __init__.py:551-552;
    _dataloader.py:209-214), whose torch RNG is seeded non-deterministically."""
    orders = []
    for _ in range(3):
        torch.manual_seed(0)
        orders.append(_epoch_order(poptorch, mode=poptorch.DataLoaderMode.Async))
    assert sorted(orders[0]) == list(range(20))
    assert len({tuple(o) for o in orders}) > 1  # the same parent seed, different orders
    # Sync: the parent's RNG decides.
    torch.manual_seed(0)
    sync = _epoch_order(poptorch)
    torch.manual_seed(0)
    assert _epoch_order(poptorch) == sync
    # Fork: a copy of the parent's RNG at construction.
    fork = {"mode": poptorch.DataLoaderMode.Async,
            "async_options": {"sharing_strategy": poptorch.SharingStrategy.Fork}}
    torch.manual_seed(0)
    a = _epoch_order(poptorch, **fork)
    torch.manual_seed(0)
    assert _epoch_order(poptorch, **fork) == a
    # The double's knob for reproducible tests.
    monkeypatch.setenv("POPTORCH_DOUBLE_WORKER_SEED", "3")
    assert _epoch_order(poptorch, mode=poptorch.DataLoaderMode.Async) == \
        _epoch_order(poptorch, mode=poptorch.DataLoaderMode.Async)


def test_generator_orders_sync_and_forked_loaders_and_cannot_reach_a_forkserver(poptorch):
    """torch 2.0.1 cannot pickle a torch.Generator; the worker's dataset is pickled
    (_dataloader.py:226-228) unless forked."""
    sync = _epoch_order(poptorch, generator=torch.Generator().manual_seed(1))
    assert sync == _epoch_order(poptorch, generator=torch.Generator().manual_seed(1))
    assert poptorch.LOG["dataloaders"][-1]["generator"] is True
    with pytest.raises(TypeError, match="cannot pickle 'torch._C.Generator' object"):
        _epoch_order(poptorch, generator=torch.Generator().manual_seed(1),
                     mode=poptorch.DataLoaderMode.Async)
    forked = _epoch_order(poptorch, generator=torch.Generator().manual_seed(1),
                          mode=poptorch.DataLoaderMode.Async,
                          async_options={"sharing_strategy": poptorch.SharingStrategy.Fork})
    assert forked == sync
    _epoch_order(poptorch)
    assert poptorch.LOG["dataloaders"][-1]["generator"] is False


class EpochSampler(torch.utils.data.Sampler):
    def __init__(self):
        self.epoch = 0

    def __iter__(self):
        return iter(range(self.epoch, self.epoch + 4))

    def __len__(self):
        return 4


def test_the_worker_has_its_own_copy_of_the_sampler(poptorch):
    """The worker process unpickles its own DataLoader (_dataloader.py:184-228)."""
    class Local(EpochSampler):
        pass

    with pytest.raises(AttributeError, match="Can't pickle local object"):
        poptorch.DataLoader(poptorch.Options(), dataset(), batch_size=2, sampler=Local(),
                            mode=poptorch.DataLoaderMode.Async)
    sampler = EpochSampler()
    loader = poptorch.DataLoader(poptorch.Options(), dataset(), batch_size=2, sampler=sampler,
                                 mode=poptorch.DataLoaderMode.Async)
    sampler.epoch = 10  # too late: the worker got its copy at construction
    assert [y.tolist() for _, y in loader] == [[0, 1], [2, 3]]


def test_loader_terminate_and_len(poptorch):
    opts = poptorch.Options().deviceIterations(2).replicationFactor(2)
    opts.Training.gradientAccumulation(2)
    loader = poptorch.DataLoader(opts, dataset(40), batch_size=2,
                                 mode=poptorch.DataLoaderMode.Async)
    assert loader.combinedBatchSize == 16 and len(loader) == 2 and loader.options is opts
    loader.terminate()
    assert poptorch.LOG["events"] == ["dataloader.terminate"]
    with pytest.raises(AssertionError):
        iter(loader)
    record = poptorch.LOG["dataloaders"][0]
    assert record == {"batch_size": 2, "combined": 16, "shuffle": False, "drop_last": True,
                      "num_workers": 0, "mode": "Async", "dataset_size": 40,
                      "generator": False, "worker_shared_bytes": 40 * 4 + 40 * 8}


# ------------------------------------------------------------------------------ executors


def test_copy_weights_to_host_before_compilation(poptorch):
    """_poplar_executor.py:30, 555-561: poptorch.Error, an Exception (poptorch.cpp:627)."""
    model = poptorch.trainingModel(Classifier(), poptorch.Options().useIpuModel(True))
    with pytest.raises(poptorch.Error, match="Model has not been compiled or has been "
                                             "destroyed.") as info:
        model.copyWeightsToHost()
    assert not isinstance(info.value, RuntimeError)
    assert info.value.message == "Model has not been compiled or has been destroyed."
    assert not model.isCompiled() and not model.isAttachedToDevice()
    with pytest.raises(poptorch.Error, match="not been compiled"):
        model.detachFromDevice()
    model.destroy()  # a no-op before compilation (1485-1486): the model stays wrapped
    with pytest.raises(RuntimeError, match="already been wrapped"):
        poptorch.trainingModel(model.model)


def test_attach_and_detach(poptorch, monkeypatch):
    """1553-1586; CompilerImpl.cpp:444-459, 716-727."""
    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "1")
    first = poptorch.inferenceModel(torch.nn.Linear(2, 2))
    second = poptorch.inferenceModel(torch.nn.Linear(2, 2))
    first(torch.zeros(1, 2))
    assert first.isAttachedToDevice()
    with pytest.raises(poptorch.Error, match="Failed to acquire 1 IPU"):
        second(torch.zeros(1, 2))
    with pytest.raises(poptorch.Error, match="Device is already attached"):
        first.attachToDevice()
    first.detachFromDevice()
    with pytest.raises(poptorch.Error, match="Device is not attached"):
        first.detachFromDevice()
    second(torch.zeros(1, 2))
    with pytest.raises(poptorch.Error, match="Failed to acquire 1 IPU"):
        first(torch.zeros(1, 2))  # attaches again implicitly, but the IPU is taken
    second.destroy()
    first(torch.zeros(1, 2))
    replicated = poptorch.inferenceModel(torch.nn.Linear(2, 2),
                                         poptorch.Options().replicationFactor(3))
    with pytest.raises(poptorch.Error, match="autoRoundNumIPUs"):
        replicated(torch.zeros(3, 2))


def test_ipu_model_cannot_replicate(poptorch):
    """Not refused in PopTorch's Python (options.py:1459-1472): the compilation fails
    (PopART docs/popart/performance.rst:83)."""
    opts = poptorch.Options().replicationFactor(2).useIpuModel(True)
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2), opts)
    with pytest.raises(poptorch.Error, match="Replication is not supported on IPU Model"):
        model(torch.zeros(2, 2))


def test_replicated_training_of_batch_norm_needs_unbroadcast_buffers(poptorch, monkeypatch):
    """poptorch/source/InplaceOps.cpp:224-233, LowerToPopartFactories.cpp:41-43."""
    monkeypatch.setenv("POPTORCH_DOUBLE_IPUS", "2")
    opts = poptorch.Options().replicationFactor(2)
    model = poptorch.trainingModel(Classifier(batch_norm=True), opts)
    with pytest.raises(poptorch.Error, match="does not support broadcasting buffers"):
        model(*batch(8))
    model.destroy()
    model = poptorch.trainingModel(Classifier(batch_norm=True),
                                   opts.clone().broadcastBuffers(False))
    model(*batch(8))


def test_inputs_must_keep_their_compiled_shape(poptorch):
    """_args_parser.py:58-144; _poplar_executor.py:1521-1535."""
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2),
                                    poptorch.Options().deviceIterations(4).useIpuModel(True))
    with pytest.raises(AssertionError, match="must be a multiple"):
        model(torch.zeros(6, 2))
    model(torch.zeros(8, 2))
    with pytest.raises(poptorch.Error, match=r"Shape mismatch for input: expected "
                                             r"torch.Size\(\[8, 2\]\)"):
        model(torch.zeros(4, 2))
    with pytest.raises(poptorch.Error, match="Data type mismatch"):
        model(torch.zeros(8, 2, dtype=torch.float64))


def test_output_modes_and_shapes(poptorch):
    """PoplarExecutable.cpp:114-124, Compiler.cpp:1310-1336; defaults 167-176."""
    def run(mode, training, period=None, replicas=1):
        opts = poptorch.Options().deviceIterations(4).useIpuModel(True)
        if mode is not None:
            opts.outputMode(mode, period)
        if training:
            opts.Training.gradientAccumulation(2)
            model = poptorch.trainingModel(Classifier(), opts)
            return model(*batch(4 * 2 * 3))
        return poptorch.inferenceModel(Classifier().eval(), opts)(*batch(4 * 3))

    out, loss = run(None, True)  # training default: Final
    assert out.shape == (3, 3) and loss.shape == ()
    out, loss = run(poptorch.OutputMode.All, True)
    assert out.shape == (24, 3) and loss.shape == (8, )
    out, loss = run(poptorch.OutputMode.Sum, True)
    assert out.shape == (3, 3) and loss.shape == ()
    out, loss = run(poptorch.OutputMode.EveryN, True, period=2)
    assert out.shape == (12, 3) and loss.shape == (4, )  # iterations 2 and 4, both micro-batches
    with pytest.raises(poptorch.Error, match="Return period must be a factor"):
        run(poptorch.OutputMode.EveryN, True, period=3)
    out, loss = run(None, False)  # inference default: All
    assert out.shape == (12, 3) and loss.shape == (4, )
    assert poptorch.LOG["executors"][0]["options"]["output_mode"] == "Final"


def test_one_optimizer_step_per_device_iteration(poptorch):
    model = Classifier()
    optimizer = poptorch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    optimizer.register_step_post_hook(lambda *a: steps.append(1))
    opts = poptorch.Options().deviceIterations(3).useIpuModel(True)
    opts.Training.gradientAccumulation(2)
    training = poptorch.trainingModel(model, opts, optimizer)
    out, loss = training(*batch(3 * 2 * 4))
    assert len(steps) == 3 and out.shape == (4, 3) and loss.shape == ()


def test_synthetic_data_ignores_the_inputs(poptorch):
    """options.py:1763-1779; PopART willow/src/ir.cpp:2447-2480."""
    opts = poptorch.Options().deviceIterations(2).enableSyntheticData(True)
    opts.useIpuModel(True)
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2), opts)
    a = model(torch.randn(4, 2))
    b = model(torch.randn(4, 2))
    assert torch.equal(a, b) and torch.equal(a[:2], a[2:])
    real = poptorch.inferenceModel(torch.nn.Linear(2, 2), poptorch.Options().useIpuModel(True))
    assert not torch.equal(real(torch.randn(4, 2)), real(torch.randn(4, 2)))


def test_mode_is_the_wrapped_copys(poptorch):
    """__init__.py:667-676, 710: a shallow copy keeps its own top-level ``training`` flag; the
    graph is fixed at the first call."""
    model = torch.nn.Dropout(0.5)
    model.eval()
    infer = poptorch.inferenceModel(model, poptorch.Options().useIpuModel(True))
    model.train()  # too late for the wrapped copy
    x = torch.ones(1000, 1)
    assert torch.equal(infer(x), x)
    assert model.training  # the user's mode is left alone


def test_outputs_refuse_backward(poptorch):
    """_poplar_executor.py:1296, 1308-1321."""
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2), poptorch.Options().useIpuModel(True))
    out = model(torch.zeros(1, 2))
    with pytest.raises(poptorch.Error, match=r"backward\(\) cannot be called explicitly"):
        out.backward()


def test_rng_state_is_refreshed_only_by_a_run(poptorch):
    """_poplar_executor.py:1122-1133: compiled but never run, rng_state is what __init__
    cached (224-226: [random_seed], or None without a seed); a run makes it dirty (1285)."""
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2), poptorch.Options().useIpuModel(True))
    model.compile(torch.zeros(1, 2))
    assert model.rng_state is None
    seeded = poptorch.inferenceModel(torch.nn.Linear(2, 2),
                                     poptorch.Options().useIpuModel(True).randomSeed(5))
    seeded.compile(torch.zeros(1, 2))
    assert seeded.rng_state == [5]
    seeded(torch.zeros(1, 2))
    assert seeded.rng_state[0] == 5 and len(seeded.rng_state) > 1


def test_popdist_has_only_its_public_functions():
    """popdist.getLocalInstanceIndex is in no public PopDist source (issue 26.7): the double
    must not offer what the real module may lack."""
    import importlib
    import sys

    sys.path.insert(0, DOUBLE)
    try:
        popdist = importlib.import_module("popdist")
        assert not hasattr(popdist, "getLocalInstanceIndex")
    finally:
        sys.path.remove(DOUBLE)


def test_offline_compilation(poptorch):
    """options.py:1584-1603, 1656-1667; _poplar_executor.py:1026-1043, 1232-1235, 1576-1578."""
    model = poptorch.inferenceModel(torch.nn.Linear(2, 2),
                                    poptorch.Options().useOfflineIpuTarget())
    with pytest.raises(AssertionError, match="offline device"):
        model(torch.zeros(1, 2))
    model.compile(torch.zeros(1, 2))
    assert model.isCompiled() and not model.isAttachedToDevice()
    with pytest.raises(AssertionError, match="offline device"):
        model.attachToDevice()


def test_distributed_loader_takes_its_share(poptorch, monkeypatch):
    """__init__.py:126-211, 401-419; options.py:466."""
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    opts = poptorch.Options()
    with pytest.raises(AssertionError, match="randomSeed"):
        poptorch.DataLoader(opts.clone(), dataset(), batch_size=2, shuffle=True)
    loader = poptorch.DataLoader(opts, dataset(), batch_size=2)
    assert [y.tolist() for _, y in loader] == [[10, 11], [12, 13], [14, 15], [16, 17],
                                               [18, 19]]


def test_inference_refuses_accumulation(poptorch):
    """_poplar_executor.py:178-194."""
    opts = poptorch.Options()
    opts.Training.gradientAccumulation(2)
    with pytest.raises(poptorch.Error, match="gradientAccumulation to 1 or leave it"):
        poptorch.inferenceModel(torch.nn.Linear(2, 2), opts)


# ------------------------------------------------------------------------------ optimizers


def test_variable_attributes_are_the_ones_passed(poptorch):
    """optim.py:50-64, 286-288; _optimizer_attributes.py:160-195."""
    params = torch.nn.Linear(2, 2).parameters
    sgd = poptorch.optim.SGD(params(), lr=0.1, loss_scaling=64.0)
    attrs = sgd.variable_attrs
    assert not attrs.isConstant("lr") and not attrs.isConstant("loss_scaling")
    assert attrs.isConstant("momentum") and sgd.defaults["momentum"] == 0
    attrs.markAsVariable("momentum")
    assert not attrs.isConstant("momentum")
    attrs.markAsConstant("momentum")
    with pytest.raises(AssertionError, match="Unknown attribute"):
        attrs.markAsVariable("beta9")
    adam = poptorch.optim.Adam(params(), lr=None)
    assert adam.defaults["lr"] == 1e-3 and adam.variable_attrs.isConstant("lr")
    assert sgd.loss_scaling == 64.0 and "loss_scaling" not in sgd.param_groups[0]
    with pytest.raises(TypeError):
        poptorch.optim.SGD(params())  # lr is mandatory for SGD


@pytest.mark.parametrize("make, variable, variant", [
    (lambda p, po: po.optim.SGD(p, lr=0.1), ["lr"], "SGD0"),
    (lambda p, po: po.optim.SGD(p, lr=0.1, momentum=0.0), ["lr", "momentum"], "SGD2"),
    (lambda p, po: po.optim.SGD(p, lr=0.1, momentum=0.9, use_combined_accum=True),
     ["lr", "momentum"], "SGD1"),
    (lambda p, po: torch.optim.SGD(p, lr=0.1), ["lr"], "SGD0"),
    (lambda p, po: torch.optim.SGD(p, lr=0.1, momentum=0.9), ["lr", "momentum"], "SGD2"),
    (lambda p, po: po.optim.LAMB(p, loss_scaling=128.0), ["loss_scaling"], None),
    (lambda p, po: po.optim.Adam(p, lr=0.01, betas=(0.8, 0.9)), ["betas", "lr"], None),
])
def test_executor_records_the_optimizer(poptorch, make, variable, variant):
    model = Classifier()
    optimizer = make(model.parameters(), poptorch)
    poptorch.trainingModel(model, poptorch.Options().useIpuModel(True), optimizer)
    record = poptorch.LOG["executors"][0]["optimizer"]
    assert record["class"] == type(optimizer).__name__
    assert record["variable"] == variable
    assert record.get("sgd_variant") == variant


def test_optimizer_state_lives_on_the_ipu(poptorch):
    """optim.py:78-105; _poplar_executor.py:393-456, 631-669, 1289-1292."""
    model = Classifier()
    optimizer = poptorch.optim.Adam(model.parameters(), lr=0.01)
    assert optimizer.state_dict()["ipu_state"] is None and not optimizer.has_state()
    training = poptorch.trainingModel(model, poptorch.Options().useIpuModel(True), optimizer)
    training(*batch(4))
    assert optimizer.host_state_is_dirty
    state = optimizer.state_dict()  # read back from the device
    assert not optimizer.host_state_is_dirty
    assert set(state) == {"ipu_state", "ipu_param", "state", "param_groups"}
    assert state["state"] == {}  # torch's host state: the IPU holds it
    assert any(k.startswith("Accl1___") for k in state["ipu_state"])
    # It round-trips, and only an IPU state loads.
    other = poptorch.optim.Adam(Classifier().parameters(), lr=0.01)
    other.load_state_dict(state)
    assert other.has_state() and other.ipu_state_is_dirty
    with pytest.raises(RuntimeError, match="Only IPU optimizer states can be loaded onto the "
                                           "IPU."):
        other.load_state_dict(torch.optim.Adam(Classifier().parameters()).state_dict())
    # Resuming: a new model continues from the saved state.
    resumed_model = Classifier()
    resumed = poptorch.optim.Adam(resumed_model.parameters(), lr=0.01)
    resumed.load_state_dict(state)
    again = poptorch.trainingModel(resumed_model, poptorch.Options().useIpuModel(True), resumed)
    again(*batch(4))
    steps = [v for k, v in resumed.state_dict()["ipu_state"].items() if k.startswith("Step___")]
    assert steps and all(float(s) == 2.0 for s in steps)


def test_set_optimizer_respects_constant_attributes(poptorch):
    """PopART willow/src/optimizervalue.cpp:25-37, reached through setOptimizer (631-669)."""
    model = Classifier()
    optimizer = poptorch.optim.LAMB(model.parameters())  # lr not passed: constant
    training = poptorch.trainingModel(model, poptorch.Options().useIpuModel(True), optimizer)
    training(*batch(4))
    for group in optimizer.param_groups:
        group["lr"] = 0.5
    with pytest.raises(poptorch.Error, match="Values are constant but do not match"):
        training.setOptimizer(optimizer)
    model2 = Classifier()
    sgd = poptorch.optim.SGD(model2.parameters(), lr=0.1)
    training2 = poptorch.trainingModel(model2, poptorch.Options().useIpuModel(True), sgd)
    training2(*batch(4))
    sgd.param_groups[0]["lr"] = 0.01
    training2.setOptimizer(sgd)  # lr was passed: variable
    assert poptorch.LOG["executors"][1]["set_optimizer_lrs"] == [0.01]


def test_unsupported_optimizer(poptorch):
    model = Classifier()
    with pytest.raises(AssertionError, match="Unsupported optimizer type"):
        poptorch.trainingModel(model, optimizer=torch.optim.Adagrad(model.parameters()))


# ------------------------------------------------------------------------------ MultiConv


def test_multiconv_checks_happen_in_the_ipu_model(poptorch):
    """ops.py:1138-1303; PopartLateCanonicalization.cpp:36; PopART builder.cpp:288-307;
    RegisterAtenOverloads.cpp:897, 958-977 (no CPU kernel)."""
    class Two(torch.nn.Module):
        def __init__(self, scope):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 1, 3), torch.nn.Conv2d(1, 1, 3)
            self.scope = scope

        def forward(self, x):
            with self.scope():
                return self.a(x) + self.b(x)

    x = torch.randn(1, 1, 5, 5)
    with pytest.raises(NotImplementedError, match="poptorch::begin_multi_conv"):
        Two(poptorch.MultiConv)(x)  # on the CPU
    ok = poptorch.inferenceModel(Two(lambda: poptorch.MultiConv().availableMemoryProportions(
        [0.1, 0.2])), poptorch.Options().useIpuModel(True))
    ok(x)
    bad = poptorch.inferenceModel(Two(lambda: poptorch.MultiConv().availableMemoryProportions(
        [0.1, 0.2, 0.3])), poptorch.Options().useIpuModel(True))
    with pytest.raises(poptorch.Error, match=r"number of availableMemoryProportions parameter "
                                             r"sets \(3\) does not match the number of input "
                                             r"sets \(2\)"):
        bad(x)

    def nested():
        class Scope:
            def __enter__(self):
                self.outer = poptorch.MultiConv()
                self.outer.__enter__()
                poptorch.MultiConv().__enter__()

            def __exit__(self, *a):
                return False
        return Scope()

    with pytest.raises(poptorch.Error, match="Nested poptorch.MultiConv is not supported"):
        poptorch.inferenceModel(Two(nested), poptorch.Options().useIpuModel(True))(x)
    with pytest.raises(AssertionError, match="Invalid plan type"):
        poptorch.MultiConv().planType("parallel")
    with pytest.raises(AssertionError, match="Invalid available memory proportion"):
        poptorch.MultiConv().availableMemoryProportions(1)
    assert poptorch.LOG["multiconv"][0]["convs"] == 2
