"""poptorch.DataLoader and poptorch.AsynchronousDataAccessor as in PopTorch 3.4
(__init__.py:126-657, _dataloader.py at sdk/poptorch/3.4.0).

The Async worker's data are computed in this process, synchronously, as by a worker that
is infinitely fast (it fills every slot the moment it becomes writable). That reproduces
deterministically the *earliest* time the real worker can overwrite data, and everything else
that follows from the worker being another process. A real worker process is started too
(forkserver by default, as PopTorch starts it), with PopTorch's handling of commands and
signals (../_poptorch_double_worker.py): once it has exited, no slot is filled any more, a
non-zero exit code is "An error occurred in the data fetcher" (assertNoError, 131-134), an
exit code 0 (a SIGINT: KeyboardInterrupt caught, 271-278) leaves the real host waiting forever
in ``__next__`` (__init__.py:651-655; the double raises instead), and a command sent to it
raises BrokenPipeError.

- The worker gets a COPY of the DataLoader (and its dataset, sampler, collate_fn ...) made when
  the loader is constructed: the real one pickles it into a forkserver/spawn child
  (_dataloader.py:184-228; default SharingStrategy.ForkServer, __init__.py:551-552) or forks
  (SharingStrategy.Fork). Tensors are shared (torch's multiprocessing reductions move them to
  shared memory); every other object is a copy, so e.g. ``loader.sampler.set_epoch(e)`` in the
  parent after construction never reaches the worker. What cannot be pickled fails at
  construction like in the real one (for ForkServer/Spawn strategies), e.g. a lambda
  collate_fn, or a ``torch.Generator`` (not picklable in torch 2.0.1, the torch PopTorch 3.4
  requires; the double refuses it whatever the installed torch).
- The worker's torch RNG is its own process's: a fresh interpreter (forkserver/spawn) is seeded
  non-deterministically by torch, so with ``shuffle=True`` and no generator the order depends
  neither on the parent's ``torch.manual_seed`` nor on anything else: it changes from run to
  run. (``POPTORCH_DOUBLE_WORKER_SEED=<int>``, double only, fixes it for tests.) Under
  SharingStrategy.Fork the worker starts from a copy of the parent's RNG state at construction.
- The first batch is loaded at construction (_dataloader.py:296-306, 359-394): an empty data
  set fails there, as "AsynchronousDataAccessor worker thread failed to start".
- The data handed out are slots of a ring buffer of ``buffer_size`` (default 3) preallocated
  tensors (_dataloader.py:381-387), filled with ``copy_`` (_dataloader.py:547-555) and returned
  as the same tensor objects (the slot's list itself, _dataloader.py:103, 812, 882-887). The slot
  of iteration i is released when iteration i+1 is asked for (``__next__`` calls
  ``releaseElement()`` first, __init__.py:646-650) and the worker refills it at once with batch
  i+buffer_size: a tensor returned by next() changes under the consumer's feet one next() later.
"""
import io
import os
import pickle
import sys
from contextlib import contextmanager
from typing import Any, Dict, Optional

import torch

from ._errors import createPoptorchError
from ._log import LOG, warn
from .enums import DataLoaderMode, SharingStrategy
from .options import Options


# ------------------------------------------------------------------------------------ helpers


class _SubDataset:
    """__init__.py:126-211: a process's block of the data set in distributed execution."""

    def __init__(self, dataset, opts, step, drop_last):
        num_elts = len(dataset)
        if drop_last:
            per_proc = step * (num_elts // (step * opts.Distributed.numProcesses))
            self._offset = opts.Distributed.processId * per_proc
            self._length = min(per_proc, num_elts - self._offset)
            self._leftovers = num_elts % per_proc
        else:
            per_proc = [(num_elts // opts.Distributed.numProcesses) +
                        (num_elts % opts.Distributed.numProcesses > proc)
                        for proc in range(opts.Distributed.numProcesses)]
            self._offset = sum(per_proc[:opts.Distributed.processId])
            self._length = per_proc[opts.Distributed.processId]
            self._leftovers = 0
        self._base_offset = self._offset
        self._dataset = dataset
        self._seed = opts.random_seed if opts.exists('random_seed') else None
        self._shuffling_generator_state = None
        self._shuffled_global_indices = None

    def shuffle_global_indices(self):
        generator = torch.Generator()
        if self._shuffling_generator_state is None:
            assert self._seed is not None, (
                "Seed must be set when shuffling so that all "
                "instances end up with the same shuffled global indices.")
            generator.manual_seed(self._seed)
        else:
            generator.set_state(self._shuffling_generator_state)
        shuffled = torch.randperm(len(self._dataset), generator=generator)
        if self._shuffled_global_indices is None:
            self._shuffled_global_indices = shuffled
        else:
            self._shuffled_global_indices.copy_(shuffled)
        self._shuffling_generator_state = generator.get_state()

    def swap_range(self):
        if self._base_offset == self._offset:
            self._offset += self._leftovers
        else:
            self._offset = self._base_offset

    def __len__(self):
        return self._length

    def __getitem__(self, index):
        global_index = index + self._offset
        if self._shuffled_global_indices is not None:
            global_index = self._shuffled_global_indices[global_index]
        return self._dataset[global_index]


_GENERATOR_PICKLE_ERROR = "cannot pickle 'torch._C.Generator' object"


class _WorkerPickler(pickle.Pickler):
    """Pickles what the real worker process receives (_dataloader.py:226-228): tensors and
    numpy arrays are shared (by reference), everything else must pickle."""

    def __init__(self, file, shared, fork):
        super().__init__(file, protocol=4)
        self._shared = shared
        self._fork = fork
        self._clones = {}

    def persistent_id(self, obj):  # noqa: D401
        if isinstance(obj, torch.Tensor):
            self._shared.append(obj)
            return ("shared", len(self._shared) - 1)
        if isinstance(obj, torch.Generator):
            if not self._fork:
                # torch 2.0.1 (PopTorch 3.4's torch) cannot pickle a Generator.
                raise TypeError(_GENERATOR_PICKLE_ERROR)
            if id(obj) not in self._clones:
                clone = torch.Generator()
                clone.set_state(obj.get_state())  # the forked child's copy
                self._shared.append(clone)
                self._clones[id(obj)] = len(self._shared) - 1
            return ("shared", self._clones[id(obj)])
        if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
            self._shared.append(obj)
            return ("shared", len(self._shared) - 1)
        return None


class _WorkerUnpickler(pickle.Unpickler):
    def __init__(self, file, shared):
        super().__init__(file)
        self._shared = shared

    def persistent_load(self, pid):
        return self._shared[pid[1]]


def _copy_for_worker(obj, fork):
    """The worker's copy of ``obj``, and the bytes of the tensors it shares with the worker:
    pickled to a forkserver/spawn child, a tensor's storage moves to shared memory (torch's
    multiprocessing reductions, torch/multiprocessing/reductions.py: reduce_storage,
    /dev/shm under the default file_descriptor strategy)."""
    shared = []
    buf = io.BytesIO()
    _WorkerPickler(buf, shared, fork).dump(obj)
    buf.seek(0)
    storages = {}
    for item in shared:
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    shared_bytes = 0 if fork else sum(storages.values())
    return _WorkerUnpickler(buf, shared).load(), shared_bytes


_FRESH_SEED = [None]


def _fresh_process_rng_state():
    """The default torch RNG of a new interpreter: seeded non-deterministically by torch
    (verified: ``torch.initial_seed()`` differs in every new process on torch 2.0.1 and 2.14)."""
    seed = os.environ.get("POPTORCH_DOUBLE_WORKER_SEED")
    seed = int(seed) if seed not in (None, "") else int.from_bytes(os.urandom(8), "little")
    return torch.Generator().manual_seed(seed).get_state()


# ------------------------------------------------------------------------------------ the worker

_STOPPED, _PREFETCHING, _LOADING = 0, 1, 2  # _dataloader.py:581-584


class _AsyncWorker:
    """_dataloader.py: AsynchronousWorker (host side, 22-146) and _AsynchronousWorkerProcess
    (the process, 149-571) with its ring buffer (_RingBufferIndex / _DataRingBuffer*,
    738-892) and end-of-file flag (_EndOfFileFlag, 665-735), run in this process."""

    def __init__(self, buffer_size, dataset, load_indefinitely, early_preload,
                 sharing_strategy, rebatched_size):
        fork = sharing_strategy == SharingStrategy.Fork
        # _dataloader.py:209-214: Fork -> fork, ForkServer -> forkserver, else spawn; 226-228:
        # the dataset travels to the child (pickled unless forked).
        self._dataset, self.shared_bytes = _copy_for_worker(dataset, fork)
        self._process = None
        self._start_process(sharing_strategy)
        self._rng = torch.get_rng_state() if fork else _fresh_process_rng_state()
        self._B = buffer_size
        self.load_indefinitely = load_indefinitely
        self._rebatched_size = rebatched_size
        self._dead = None
        self.terminated = False
        # ---- worker start-up (_mainLoopNoInterrupt, _dataloader.py:293-394)
        with self._worker_rng():
            self._it = iter(self._dataset)
            self._rebatched_drop_last = getattr(self._dataset, "rebatched_drop_last", True)
            data = None
            try:
                data = next(self._it)
            except StopIteration:
                pass
        if data is None:
            # The child raises "The Dataset is empty" (306) and dies before sending its buffers;
            # the parent gets EOFError and raises this (_dataloader.py:251-256).
            print("'poptorch_py_error': The Dataset is empty (AsynchronousDataAccessor worker "
                  "process)", file=sys.stderr)
            raise createPoptorchError("AsynchronousDataAccessor worker thread failed to start "
                                      "(Check above for details)")
        self._is_single_tensor = False
        self._dict_keys = []
        if isinstance(data, torch.Tensor):
            self._is_single_tensor = True
            data = (data, )
        elif isinstance(data, dict):
            self._dict_keys = list(data.keys())
            data = tuple(data[k] for k in self._dict_keys)
        self._next_batch_idx = 0
        self._slots = [[None] * len(data) for _ in range(buffer_size)]
        for index, tensor in enumerate(data):
            if not isinstance(tensor, torch.Tensor):
                # _dataloader.py:359-366 (an assertion in the child: the parent sees EOF)
                print(f"AssertionError: Tensor at index {index} is not a torch tensor "
                      f"({type(tensor)}). AsynchronousDataAccessor expects data to be organised"
                      " as a flat 1D container of tensors.", file=sys.stderr)
                raise createPoptorchError("AsynchronousDataAccessor worker thread failed to "
                                          "start (Check above for details)")
            tensor_size = [*tensor.size()]
            if self._rebatched_size:
                # _dataloader.py:370-380
                self._next_batch_idx = tensor_size[0]
                if tensor_size[0] != self._rebatched_size:
                    repeat_count = -(-self._rebatched_size // tensor_size[0])
                    tensor = tensor.repeat(repeat_count, *[1] * (len(tensor_size) - 1)
                                           )[:self._rebatched_size]
                    tensor_size[0] = self._rebatched_size
            # _dataloader.py:381-387: every slot starts as a copy of the first batch.
            memory = tensor.expand(buffer_size, *tensor_size).clone().contiguous()
            for d in range(buffer_size):
                self._slots[d][index] = memory[d]
        # The ring index: True = ready to read, False = writable (_dataloader.py:843-875).
        self._ready = [False] * buffer_size
        self._w = 0   # writer index
        self._r = 0   # reader index
        self._locked = None
        self._eof = [-1, 0]  # _EndOfFileFlag (665-735)
        if self._rebatched_size is None or self._next_batch_idx == self._rebatched_size:
            self._next_batch_idx = 0
            self._mark_write_complete()  # _dataloader.py:390-394
        self._state = _PREFETCHING if early_preload else _STOPPED  # 398-401
        self._start_pending = False
        self._pending = None
        self._pending_eof = False
        self._leftover = []
        self.was_used = False
        self.worker_started = False
        if early_preload:
            self._pump()

    def _start_process(self, sharing_strategy):
        """A real worker process, started as PopTorch starts its own (_dataloader.py:209-256),
        that receives the host's commands and the signals sent to the process group as the
        real one does (tests/poptorch_double/_poptorch_double_worker.py)."""
        import multiprocessing  # torch.multiprocessing's contexts are multiprocessing's

        from _poptorch_double_worker import worker_main

        method = {SharingStrategy.Fork: "fork",
                  SharingStrategy.ForkServer: "forkserver"}.get(sharing_strategy, "spawn")
        ctx = multiprocessing.get_context(method)
        self._replies, replies_write = ctx.Pipe(duplex=False)
        command_read, self._commands = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=worker_main, args=(replies_write, command_read),
                                    daemon=True)
        self._process.start()
        replies_write.close()
        command_read.close()
        try:
            self._replies.recv()
        except EOFError:  # 251-256
            raise createPoptorchError("AsynchronousDataAccessor worker thread failed to start "
                                      "(Check above for details)") from None

    def process_alive(self):
        # isAlive (165-166)
        return self._process is not None and self._process.exitcode is None

    def send_command(self, command):
        # resetIterator sends ResetIterator / StartIterating over the command pipe (64, 72): to
        # a worker that has exited, that is BrokenPipeError in the host.
        self._commands.send(command)
        try:
            self._replies.recv()  # the worker took it (the double's stand-in for its data)
        except EOFError:
            self._process.join()  # it has exited: no more data (_pump), its exit code known

    def stop_process(self):
        # AsynchronousWorker.terminate (39-43) and _AsynchronousWorkerProcess.join (171-182):
        # Shutdown, then SIGINT, then SIGTERM, each given 10 s.
        import signal as signal_module

        if self._process is None:
            return
        if self.process_alive():
            try:
                self._commands.send("Shutdown")
            except BrokenPipeError:
                pass
        self._process.join(timeout=10)
        if self.process_alive():
            os.kill(self._process.pid, signal_module.SIGINT)
            self._process.join(timeout=10)
        if self.process_alive():
            self._process.terminate()
            self._process.join()
        self._commands.close()
        self._replies.close()
        self._process = None

    @contextmanager
    def _worker_rng(self):
        parent = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(parent)

    def _mark_write_complete(self):
        # _DataRingBufferWriter.markWriteComplete (843-847)
        self._ready[self._w] = True
        self._w = (self._w + 1) % self._B

    # ---- the worker process's loop, until it would block (_dataloader.py:404-563)
    def _pump(self):
        if self._dead is not None or self.terminated or not self.process_alive():
            return  # an exited worker process fills no more slots
        try:
            self._pump_unsafe()
        except Exception as exc:  # the worker process dies; the host sees it later (131-134)
            self._dead = exc
            print(f"AsynchronousDataAccessor worker process: {type(exc).__name__}: {exc}",
                  file=sys.stderr)

    def _pump_unsafe(self):
        while True:
            if self._state == _STOPPED:
                if not self._start_pending:
                    return  # waitUntilStartIteration (408)
                self._start_pending = False
                self._state = _LOADING
            elif self._state == _PREFETCHING and self._start_pending:
                self._start_pending = False  # 411-415
                self._state = _LOADING
            if self._pending is None and not self._pending_eof:
                if self._leftover:
                    self._pending, self._leftover = self._leftover, []  # 440-442
                else:
                    try:
                        with self._worker_rng():
                            data = next(self._it)
                        if isinstance(data, torch.Tensor):
                            data = (data, )
                        elif isinstance(data, dict):
                            assert len(data) == len(self._dict_keys)
                            data = tuple(data[k] for k in self._dict_keys)
                        self._pending = data
                    except StopIteration:
                        self._pending_eof = True  # 461-465
            if self._ready[self._w]:
                return  # no writing slot: wait for the host to release one (467-473)
            if self._pending_eof:
                if self._state == _PREFETCHING:
                    if not self._start_pending:
                        return  # 492-494: wait for the host before signalling EOF
                    self._start_pending = False
                if self._rebatched_size and not self._rebatched_drop_last \
                        and self._next_batch_idx != 0:
                    self._eof = [self._w, self._next_batch_idx]  # 496-503
                    self._mark_write_complete()
                else:
                    self._eof = [self._w, 0]  # 505
                self._pending_eof = False
                if not self.load_indefinitely:
                    self._state = _STOPPED  # 509-515
                    return
                self._state = _PREFETCHING  # 519-527: next epoch's iterator, prefetching
                with self._worker_rng():
                    self._it = iter(self._dataset)
                self._next_batch_idx = 0
                continue
            data, self._pending = self._pending, None
            slot = self._slots[self._w]
            if self._rebatched_size:
                # 530-551
                copy_size = 0
                for index, tensor in enumerate(data):
                    in_size = len(tensor)
                    out_size = self._rebatched_size - self._next_batch_idx
                    copy_size = min(in_size, out_size)
                    if in_size > out_size:
                        self._leftover.append(tensor[copy_size:])
                    slot[index][self._next_batch_idx:self._next_batch_idx + copy_size].copy_(
                        tensor[:copy_size])
                self._next_batch_idx += copy_size
            else:
                for index, tensor in enumerate(data):
                    slot[index].copy_(tensor)  # 553-555: in place, into the slot's tensor
            if self._rebatched_size is None or self._next_batch_idx == self._rebatched_size:
                self._next_batch_idx = 0
                self._mark_write_complete()  # 559-563

    # ---- host side (AsynchronousWorker, _dataloader.py:22-146)
    def end_of_file(self):
        # endOfFile / _EndOfFileFlag.isEofIndex (79-80, 701-702)
        return self._eof[0] == self._r and self._eof[1] == 0

    def release_element(self):
        # releaseElement -> unlockIfLocked (136-139, 889-892); the worker may refill the slot
        # from now on: the double does it at once.
        if self._locked is not None:
            self._ready[self._locked] = False
            self._locked = None
        self._pump()

    def acquire_element_if_available(self):
        # acquireElementIfAvailable (82-129)
        assert self._locked is None, (
            "The current element must be released by calling releaseElement() before trying "
            "to acquire a new one")
        if not self._ready[self._r] or self.end_of_file():
            return None
        left_over = self._eof[1] if self._eof[0] == self._r else 0
        self._locked = self._r
        data = self._slots[self._r]
        self._r = (self._r + 1) % self._B
        self.was_used = True
        if left_over > 0:
            data = [d.narrow(0, 0, left_over) for d in data]
            self._eof = [self._r, 0]
        if self._is_single_tensor:
            return data[0]
        if self._dict_keys:
            return dict(zip(self._dict_keys, data))
        return data

    def assert_no_error(self):
        # assertNoError (131-134): the worker died; an exit code 0 (a worker that caught
        # KeyboardInterrupt, 271-278) is no error, and the host keeps waiting.
        if self._dead is not None or (not self.process_alive() and
                                      self._process.exitcode != 0):
            raise AssertionError("An error occurred in the data fetcher")

    def reset_iterator(self):
        # resetIterator (45-74)
        if self.worker_started and not self.was_used:
            return
        if self.was_used and (not self.end_of_file() or
                              (self.end_of_file() and not self.load_indefinitely)):
            # ResetIterator: the worker drops what it holds, starts a new iterator, all slots
            # writable (418-435); the host resets its reader (65-68).
            if self._locked is not None:
                self._ready[self._locked] = False
                self._locked = None
            self._ready = [False] * self._B
            self._w = self._r = 0
            self._pending, self._pending_eof, self._leftover = None, False, []
            self._next_batch_idx = 0
            if self._dead is None:
                with self._worker_rng():
                    self._it = iter(self._dataset)
            self._state = _STOPPED
            self.send_command("ResetIterator")
        self._eof = [-1, 0]  # clearFlag
        self.send_command("StartIterating")
        self._start_pending = True  # StartIterating
        self.was_used = False
        self.worker_started = True
        self._pump()


# ------------------------------------------------------------------------------------ public


class DataLoader(torch.utils.data.DataLoader):
    """__init__.py:229-523."""

    def __init__(self,
                 options: Options,
                 dataset,
                 batch_size: int = 1,
                 shuffle: bool = None,
                 num_workers: int = 0,
                 drop_last: bool = True,
                 persistent_workers: Optional[bool] = None,
                 auto_distributed_partitioning: bool = True,
                 mode: DataLoaderMode = DataLoaderMode.Sync,
                 async_options: Optional[Dict[str, Any]] = None,
                 rebatched_worker_size: Optional[int] = None,
                 batch_sampler=None,
                 **kwargs):
        self._accessor = None
        given_mode, given_shuffle, given_drop_last = mode, shuffle, drop_last
        self._is_user_batch_sampler_set = batch_sampler is not None
        if self._is_user_batch_sampler_set:
            # __init__.py:293-306
            if batch_size != 1 or shuffle:
                raise createPoptorchError('`batch_sampler` option is mutually '
                                          'exclusive with batch_size, shuffle.')
            if options.Distributed.numProcesses > 1 and auto_distributed_partitioning:
                raise createPoptorchError('`batch_sampler` option is mutually '
                                          'exclusive with auto_distributed_partitioning=True.')
            if hasattr(batch_sampler, "batch_size"):
                batch_size = batch_sampler.batch_size
            self.batch_sampler_drop_last = drop_last
            drop_last = None
        elif shuffle is None:
            shuffle = False
        assert isinstance(options, Options)
        options._freeze()  # __init__.py:312: the options are frozen from now on
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        self._options = options
        if batch_size is None:
            self._combined_batch_size = None
            self._num_batches_to_combine = None
        else:
            # __init__.py:323-331: batch_size x device_iterations x (replicas / input group
            # size) x gradient_accumulation
            input_group_count = options.replication_factor // options.input_group_size
            self._num_batches_to_combine = (options.device_iterations * input_group_count *
                                            options.Training.gradient_accumulation)
            self._combined_batch_size = batch_size * self._num_batches_to_combine
        self._is_iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        given_size = None if self._is_iterable else len(dataset)
        self._shuffle_map_style_data_in_distributed_env = False
        if self._is_iterable:
            if auto_distributed_partitioning:
                assert options.Distributed.numProcesses == 1, (
                    "auto_distributed_partitioning not supported for IterableDataset")
        else:
            num_elts = len(dataset)
            if not drop_last and not self._is_user_batch_sampler_set and \
                    self._combined_batch_size is not None and \
                    num_elts % (self._combined_batch_size * options.Distributed.numProcesses):
                # __init__.py:386-399
                warn("The number of elements in the dataset (%d) is not divisible by the "
                     "number of elements processed per step (%d) and drop_last=False. The last "
                     "tensor will have a batch size of %d. To avoid having to handle this "
                     "special case switch to drop_last=True" % (
                         num_elts, self._combined_batch_size * options.Distributed.numProcesses,
                         num_elts % (self._combined_batch_size *
                                     options.Distributed.numProcesses)))
            if options.Distributed.numProcesses > 1 and auto_distributed_partitioning:
                # __init__.py:401-419
                assert not shuffle or options.exists("random_seed"), (
                    "When using auto_distributed_partitioning you must set "
                    "poptorch.Options.randomSeed() to ensure that tensors "
                    "are in the same order in all processes.")
                assert self._combined_batch_size is not None, (
                    "batch_size=None not allowed when using auto_distributed_partitioning.")
                dataset = _SubDataset(dataset, options, self._combined_batch_size, drop_last)
                if shuffle:
                    self._shuffle_map_style_data_in_distributed_env = True
                    shuffle = False
        rebatched_size = None
        dataset_batch_size = 1 if self._is_user_batch_sampler_set else self._combined_batch_size
        real_drop_last = (self.batch_sampler_drop_last if self._is_user_batch_sampler_set
                          else drop_last)
        cbs_is_gt_one = self._combined_batch_size is not None and self._combined_batch_size > 1
        async_mode_with_remainder = (mode == DataLoaderMode.Async and not real_drop_last
                                     and cbs_is_gt_one)
        if mode == DataLoaderMode.AsyncRebatched or async_mode_with_remainder:
            # __init__.py:432-448: since SDK 3.2, Async + drop_last=False is rebatched in the
            # worker to the combined batch size; the workers' DataLoader keeps the leftovers.
            mode = DataLoaderMode.Async
            rebatched_size = self._combined_batch_size
            self.rebatched_drop_last = drop_last
            drop_last = False
            if rebatched_worker_size is not None:
                assert rebatched_worker_size <= self._combined_batch_size, (
                    f"The rebatched_worker_size ({rebatched_worker_size})"
                    " must be <= to the combined batch size ("
                    f"{self._combined_batch_size})")
                dataset_batch_size = rebatched_worker_size
        self._requested_num_workers = num_workers
        super().__init__(dataset, batch_size=dataset_batch_size, shuffle=shuffle,
                         batch_sampler=batch_sampler, num_workers=num_workers,
                         drop_last=drop_last, persistent_workers=persistent_workers, **kwargs)
        LOG["dataloaders"].append({"batch_size": batch_size,
                                   "combined": self._combined_batch_size,
                                   "shuffle": bool(given_shuffle), "drop_last": given_drop_last,
                                   "num_workers": num_workers,
                                   "mode": getattr(given_mode, "name", str(given_mode)),
                                   "dataset_size": given_size,
                                   "generator": kwargs.get("generator") is not None})
        if mode == DataLoaderMode.Async:
            # __init__.py:459-466
            async_options = async_options or {}
            assert "rebatched_size" not in async_options, (
                "You cannot use DataLoaderMode.AsyncRebatched and manually specify"
                " the rebatched_size in async_options")
            accessor = AsynchronousDataAccessor(self, **async_options,
                                                rebatched_size=rebatched_size)
            self._accessor = accessor
            LOG["dataloaders"][-1]["worker_shared_bytes"] = accessor._worker.shared_bytes

    def _get_iterator(self):
        # The double loads in the process that iterates (no torch worker processes); a
        # persistent iterator is reset per epoch as torch does (same RNG draws as torch's
        # base_seed + sampler seed).
        return _InProcessIter(self)

    def __len__(self) -> int:
        # __init__.py:468-480
        if self._accessor is not None and self._accessor.rebatched_size:
            num_elts = len(self.dataset)
            dataset_len = num_elts // self._accessor.rebatched_size
            if not self.rebatched_drop_last and num_elts % self._accessor.rebatched_size:
                dataset_len += 1
        else:
            dataset_len = super().__len__()
        return dataset_len

    @property
    def combinedBatchSize(self) -> Optional[int]:
        return self._combined_batch_size

    @property
    def options(self) -> Options:
        return self._options

    def terminate(self) -> None:
        # __init__.py:499-505
        LOG["events"].append("dataloader.terminate")
        if self._accessor is not None:
            self._accessor.terminate()

    def __del__(self) -> None:
        accessor = self.__dict__.get("_accessor")
        if accessor is not None:
            accessor.terminate()

    def __iter__(self):
        # __init__.py:510-523
        if self._shuffle_map_style_data_in_distributed_env:
            self.dataset.shuffle_global_indices()
            self.dataset.swap_range()
        if self._accessor is not None:
            return self._accessor.__iter__()
        if self._is_user_batch_sampler_set and self._num_batches_to_combine != 1:
            return _combined_batch_generator(super().__iter__(), self._num_batches_to_combine,
                                             self.batch_sampler_drop_last)
        return super().__iter__()


class _InProcessIter(torch.utils.data.dataloader._SingleProcessDataLoaderIter):
    """torch's single-process iterator, whatever ``num_workers`` says (``num_workers`` stays
    what the user gave, for torch's own checks and persistent-iterator behaviour)."""

    def __init__(self, loader):  # pylint: disable=super-init-not-called
        torch.utils.data.dataloader._BaseDataLoaderIter.__init__(self, loader)
        self._num_workers = 0
        self._dataset_fetcher = torch.utils.data.dataloader._DatasetKind.create_fetcher(
            self._dataset_kind, self._dataset, self._auto_collation, self._collate_fn,
            self._drop_last)


def _combined_batch_generator(iterator, num, drop_last):
    # _utils.py:151-175 (for flat lists/tuples of tensors)
    group = []
    for batch in iterator:
        group.append(batch)
        if len(group) == num:
            yield _concat(group)
            group = []
    if group and not drop_last:
        yield _concat(group)


def _concat(batches):
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, dict):
        return {k: torch.cat([b[k] for b in batches]) for k in first}
    return type(first)(torch.cat(parts) for parts in zip(*batches))


class AsynchronousDataAccessor:
    """__init__.py:526-657."""

    def __init__(self, dataset, buffer_size: int = 3, miss_sleep_time_in_ms: float = 0.1,
                 load_indefinitely: bool = True, early_preload: bool = False,
                 sharing_strategy: SharingStrategy = SharingStrategy.ForkServer,
                 rebatched_size: Optional[int] = None):
        self._worker = None
        if isinstance(dataset, DataLoader) and dataset._accessor is not None:
            # __init__.py:590-595
            raise createPoptorchError(
                "The DataLoader already uses an AsynchronousDataAccessor internally. Either use "
                "the existing one or set mode='poptorch.DataLoaderMode.Sync' in the DataLoader.")
        if isinstance(dataset, DataLoader) and not dataset._is_user_batch_sampler_set and \
                not dataset.drop_last and rebatched_size is None:
            # __init__.py:597-607
            assert dataset.combinedBatchSize is None or dataset.combinedBatchSize == 1, (
                "The 'drop_last=False' option from the DataLoader only "
                "works if 'rebatched_size' is specified too.")
        if rebatched_size is not None:
            assert rebatched_size > 1, "rebatched_size must be None or greater than 1"
        self._dataset = dataset
        self.rebatched_size = rebatched_size
        self._worker = _AsyncWorker(buffer_size, dataset, load_indefinitely, early_preload,
                                    sharing_strategy, rebatched_size)

    def terminate(self) -> None:
        # __init__.py:620-626
        if self._worker is not None:
            self._worker.terminated = True
            self._worker.stop_process()
            self._worker = None

    def __del__(self) -> None:
        self.terminate()

    def __len__(self) -> int:
        # __init__.py:631-639
        dataset_len = len(self._dataset)
        if self.rebatched_size and getattr(self._dataset, "_accessor", None) is not self:
            num_elts = dataset_len * self._dataset.batch_size
            dataset_len = num_elts // self.rebatched_size
        return dataset_len

    def __iter__(self):
        # __init__.py:641-644
        assert self._worker is not None
        self._worker.reset_iterator()
        return self

    def __next__(self):
        # __init__.py:646-657: release the previous slot first (the worker may overwrite it
        # from then on), then wait for the next one.
        assert self._worker is not None
        self._worker.release_element()
        while not self._worker.end_of_file():
            data = self._worker.acquire_element_if_available()
            if data is not None:
                return data
            self._worker.assert_no_error()
            raise RuntimeError("poptorch double: the Async worker can make no progress (the "
                               "real consumer would wait forever here)")
        raise StopIteration


__all__ = ["DataLoader", "AsynchronousDataAccessor"]
