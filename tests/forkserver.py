"""run.py through a fork server, for the tests: the same program, without paying its imports.

A test that runs ``python run.py ...`` spends most of a small run importing torch, torchvision,
Hydra and the optimisers' ``torch._dynamo`` (about 6 of a 1-epoch smoke run's 10 seconds on the
project's 2-core VM, against 3.5 through this server). The server is a Python process started
once per test session that imports those libraries and then forks one child per run: the child
is a new process (its own pid, process group, cwd, environment, stdin/stdout/stderr, argv) that
runs run.py as ``__main__`` with ``runpy``, exactly as ``python run.py`` would from that point.

What a fork cannot give a run, and where :func:`usable` sends the run to a real
``python run.py`` subprocess instead:
- environment variables read while those libraries were imported (``OMP_NUM_THREADS``,
  ``TORCH_*``, ``LD_PRELOAD``, ...): only variables read later, at run time (this project's own
  ``OCTCONV_EXP_*``, launcher and cluster variables, PopTorch's, MLflow's, Hydra's) may differ
  from the server's environment;
- a ``PYTHONPATH`` entry that shadows an imported library (a test's fake ``torch``, a
  ``sitecustomize``);
- start-up itself: tests about what happens while run.py imports (signals at start-up, the
  deferred torch import) start their processes themselves, not through ``run_cli``.
``OCTCONV_EXP_TEST_FORKSERVER=0`` turns the server off for a whole session (every run a real
subprocess): docs/development.md.

The protocol is JSON lines over the server's stdin/stdout: a request; the child's pid, at
once; its exit status when it ends. Several children may run at once (:meth:`ForkServer.spawn`,
``conftest.popen_python``: a test's two sweeps started together, a sweep a test signals).
Programs that another program starts (torchrun's ranks, a joblib sweep's loky workers) ask
through ``forkclient.py`` on a Unix socket (:meth:`ForkServer.client_env`): the same JSON
request with the client's standard streams and inherited descriptors passed along
(SCM_RIGHTS), answered on that connection; a client whose connection closes (killed) takes its
child with it. Such a child leads a process group of its own, as every child does; a signal to
the group its parent started it in reaches it through the client.
"""
import array
import fcntl
import json
import os
import queue
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading

#: What the server imports before it forks: what every run.py run imports anyway.
PREIMPORT = ("numpy", "yaml", "PIL.Image", "torch", "torch._dynamo", "torch.nn", "torch.optim",
             "torchvision", "omegaconf", "hydra", "hydra.main", "hydra.utils",
             "hydra.core.config_store", "octconv", "matplotlib", "matplotlib.figure",
             "matplotlib.backends.backend_agg",
             # What searches, MLflow runs and exports import (3.8 s, 2 s, 1.5 s here): none
             # starts a thread or changes the environment when imported (MLflow 2.17-3.x sets
             # _MLFLOW_TELEMETRY_SESSION_ID, a run-time key); ONNX Runtime's threads start
             # with a session.
             "optuna", "mlflow", "onnx", "onnxruntime")

#: This project's modules the server imports too (its sweepers found by Hydra's plugin scan):
#: not the ``-m`` entry modules (``octconv_exp.validate``, ...), which runpy must import itself.
#: A child whose ``sys.path`` finds another ``octconv_exp`` first (a copy of the repository)
#: is refused (:meth:`ForkServer.refusal`); one that finds none forgets the server's copy.
#: No module of the package reads the environment when it is imported (the test hooks read
#: it when a run uses them).
PROJECT = "octconv_exp"
PROJECT_PREIMPORT = ("octconv_exp.config.schema", "octconv_exp.cli.preflight",
                     "octconv_exp.cli.outcome", "octconv_exp.cli.validate",
                     "octconv_exp.training.runner", "octconv_exp.reports.report")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Environment variables that may differ between the server and a run: read at run time.
RUN_TIME_PREFIXES = ("OCTCONV_EXP_", "POPTORCH_", "POPDIST_", "OMPI_", "SLURM_", "SUBMITIT_",
                     "MLFLOW_", "_MLFLOW_", "HYDRA_", "TORCHELASTIC_", "MASTER_", "PYTEST_")
RUN_TIME_KEYS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "PYTHONPATH", "COLUMNS", "LINES",
                 # The rest of what torchrun's agent sets for a rank (torch/distributed/elastic/
                 # agent/server/local_elastic_agent.py, worker_env, torch 2.0-2.14); the NCCL
                 # ones are read when a NCCL process group starts.
                 "ROLE_NAME", "GROUP_WORLD_SIZE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                 "NCCL_ASYNC_ERROR_HANDLING",
                 # Set by code the tests run in-process (PopTorch's import sets the first, a
                 # deterministic run the second); read when RDMA / cuBLAS start, not at import.
                 "RDMAV_FORK_SAFE", "CUBLAS_WORKSPACE_CONFIG",
                 # Set by torch when it first needs inductor's cache dir (torch 2.x
                 # _inductor/runtime/cache_dir_utils.py: os.environ.get, else the default,
                 # written back), which importing torch._dynamo does: in the tests' process
                 # whenever a test first builds an optimiser there (torchvision no longer
                 # imports it at collection). Read again whenever inductor compiles.
                 "TORCHINDUCTOR_CACHE_DIR",
                 # Set by joblib's import (joblib/__init__.py: setdefault "FALSE"), so a joblib
                 # sweep gives it to its loky workers; read only by Intel's OpenMP runtime
                 # (libiomp5) when it loads, and torch's Linux wheels use GNU libgomp.
                 "KMP_INIT_AT_FORK",
                 # The shell's working directory: what a parent that changed directory passes
                 # on (a search's MLflow run); read by no library when it is imported.
                 "PWD"}


def _project_in(first, env):
    """Where a program whose ``sys.path`` starts with ``first`` and the PYTHONPATH of ``env``
    imports the project from (None: it does not find it there)."""
    entries = [first] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    for entry in entries:
        package = os.path.join(entry, PROJECT)
        if os.path.isfile(os.path.join(package, "__init__.py")):
            return os.path.realpath(package)
        if os.path.isfile(package + ".py"):
            return os.path.realpath(package + ".py")
    return None


def project_refusal(argv, cwd, env, project):
    """Why ``python ARGV`` run in ``cwd`` must not be served by a server whose copy of the
    package is ``project``: the program would import another copy (None: it would not; one
    that finds none has the server's copy taken out of ``sys.modules``)."""
    first = cwd if argv[0] == "-m" else os.path.dirname(os.path.abspath(os.path.join(cwd, argv[0])))
    found = _project_in(first, env)
    if found is not None and found != project:
        return f"{PROJECT} there is {found}, not the server's {project}"
    return None


#: Read when the CUDA driver (libcuda.so) initialises: a run-time key where the server's imports
#: did not load the driver (torch loads it at the first CUDA call, not at import). submitit's
#: local launcher sets it for its controller and tasks (submitit/local/local.py).
DRIVER_KEYS = ("CUDA_VISIBLE_DEVICES",)


def cuda_driver_loaded():
    """Whether this process has loaded the CUDA driver (and so has read DRIVER_KEYS)."""
    with open("/proc/self/maps") as maps:
        return any("/libcuda.so" in line for line in maps)


def env_refusal(env, base, modules, driver_loaded=True):
    """Why a program with environment ``env`` must not be served by a server started with
    ``base`` that has ``modules`` imported (None: it may); ``driver_loaded``: whether the
    server has loaded the CUDA driver (:func:`cuda_driver_loaded`)."""
    for key in sorted(set(env) | set(base)):
        if env.get(key) != base.get(key) and not (
                key in RUN_TIME_KEYS or key.startswith(RUN_TIME_PREFIXES)
                or (key in DRIVER_KEYS and not driver_loaded)):
            return f"{key} differs from the server's environment"
    for entry in env.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isdir(entry):
            names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(entry)}
            if names & (set(modules) | {"sitecustomize", "usercustomize"}):
                return f"PYTHONPATH entry {entry} shadows an imported module"
    return None


def _exit_code(status):
    """subprocess's returncode for a waitpid status (os.waitstatus_to_exitcode is 3.9+)."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# ---------------------------------------------------------------------------- the server side

def limit_file_size(limit):
    """``ulimit -f``: files this process writes may grow to ``limit`` bytes (RLIMIT_FSIZE),
    SIGXFSZ ignored, so that a write past it fails with EFBIG instead of killing the process."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _child(request, base_path, stdio=None):
    """In the forked child: become ``python ARGV`` (a script or ``-m MODULE``) and never
    return. ``stdio``: the standard streams a client passed (else /dev/null and the request's
    files); ``request["unbuffered"]``: as ``python -u``; ``request["file_size_limit"]``: as
    ``ulimit -f`` before it started (:func:`limit_file_size`)."""
    import io
    import random
    import runpy

    os.setpgid(0, 0)  # its own process group: a run that signals its group reaches only itself
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if stdio is None:
        stdio = (os.open(os.devnull, os.O_RDONLY),
                 os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                 os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    # The client's descriptors at the numbers the program was given (its standard streams,
    # then what its parent passed on: loky's pipes), moved out of the way first.
    targets = list(range(3)) + list(request.get("fds") or [])
    high = max(targets + [255]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, high) for fd in stdio]
    for fd in stdio:
        os.close(fd)
    for target, fd in zip(targets, moved):
        os.dup2(fd, target)
        os.close(fd)
    if request.get("unbuffered"):  # python -u: unbuffered binary layer, write-through text
        sys.stdout, sys.stderr = (
            io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding=stream.encoding,
                             errors=stream.errors, write_through=True)
            for fd, stream in ((1, sys.stdout), (2, sys.stderr)))
    if request.get("file_size_limit") is not None:
        limit_file_size(int(request["file_size_limit"]))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    argv = list(request["argv"])
    entries = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    if argv[0] == "-m":  # python -m MODULE: the current directory comes first
        sys.path[:] = [os.getcwd()] + entries + base_path
        sys.argv[:] = argv[1:]
    else:
        sys.path[:] = [os.path.dirname(os.path.abspath(argv[0]))] + entries + base_path
        sys.argv[:] = argv
    if _project_in(sys.path[0], request["env"]) == request["project"]:
        # What the package's import does to sys.path in a fresh process.
        sys.modules["octconv_exp.config.resolvers"].add_plugins_to_path()
    else:  # a program that does not find the package: importing it fails, as it would
        for name in [n for n in sys.modules if n == PROJECT or n.startswith(PROJECT + ".")
                     or n.startswith("hydra_plugins.octconv_exp_sweeper")]:
            del sys.modules[name]
    if request.get("executable"):  # what the program starts as "python": forkclient.py
        sys.executable = request["executable"]
    if argv[0] == "-m" and argv[1] in sys.modules:  # python -m runs a module not yet imported
        del sys.modules[argv[1]]
    random.seed()  # a fresh process's state, not the server's
    try:
        import numpy
        numpy.random.seed()
    except ImportError:
        pass
    code = 0
    interrupted = False
    try:
        if argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        interrupted = True
    except BaseException:  # noqa: BLE001 - the interpreter's own: traceback, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    # What Py_FinalizeEx does before the process ends: join non-daemon threads, run atexit.
    try:
        threading._shutdown()
    except Exception:  # noqa: BLE001
        pass
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    if interrupted:  # CPython ends an uncaught KeyboardInterrupt by SIGINT's default action
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def serve(socket_path=None):
    """The server's loop: import, say which top-level modules are loaded, fork per request
    (the tests' requests on stdin; with ``socket_path``, also clients' on that Unix socket)."""
    import importlib

    base_env = dict(os.environ)  # before any import sets a variable of its own

    for name in PREIMPORT:
        importlib.import_module(name)
    initial_pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    base_path = [p for p in sys.path[1:] if p not in initial_pythonpath]
    saved_path = list(sys.path)
    sys.path.insert(0, REPO)  # as run.py's folder is for its child
    for name in PROJECT_PREIMPORT:
        importlib.import_module(name)
    from hydra.core.plugins import Plugins

    Plugins.instance()  # Hydra's scan of hydra_plugins, ours included (as every run does)
    sys.path[:] = saved_path
    if threading.active_count() != 1:  # a fork copies no thread, but every lock they held
        raise RuntimeError("an import started a thread: "
                           + ", ".join(t.name for t in threading.enumerate()))
    fd_in, channel_out = sys.stdin.fileno(), os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing else may write into the channel
    top = sorted({name.split(".")[0] for name in sys.modules})
    project = os.path.realpath(os.path.dirname(sys.modules[PROJECT].__file__))
    listener = None
    if socket_path:  # programs that other programs start (torchrun's ranks): forkclient.py
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(socket_path)
        listener.listen(16)

    def say(message):
        channel_out.write(json.dumps(message) + "\n")
        channel_out.flush()

    def fork(request, stdio=None):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            channel_out.close()
            os.close(fd_in)
            for sock in ([listener] if listener else []) + list(clients):
                sock.close()
            try:
                _child(request, base_path, stdio)
            finally:
                os._exit(70)
        return pid

    driver_loaded = cuda_driver_loaded()
    say({"ready": True, "modules": top, "project": project, "cuda_driver_loaded": driver_loaded})
    # Several children may run at once (a test's two sweeps started together): each request
    # is answered with the child's pid at once, and each child's end when it ends. A
    # client's child is answered on the client's connection; a client that goes away (killed)
    # takes its child with it, as a killed process takes nothing else.
    running, pending = {}, b""  # pid -> None (the tests' request) or the client's socket
    clients = {}  # socket -> {"data": bytes, "stdio": fds, "pid": pid or None}
    while True:
        watched = [fd_in] + ([listener] if listener else []) + list(clients)
        ready, _, _ = select.select(watched, [], [], 0.05 if running else None)
        for pid in list(running):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                # cpu: the child's user + system seconds, its reaped children's included.
                ended = {"exited": pid, "returncode": _exit_code(status),
                         "cpu": usage.ru_utime + usage.ru_stime}
                client = running.pop(pid)
                if client is None:
                    say(ended)
                    continue
                say({"cpu": ended["cpu"]})  # a client's: counted for the test that runs it
                if client is not _GONE:
                    _send(client, ended)
                    clients.pop(client, None)
                    client.close()
        if listener is not None and listener in ready:
            client, _ = listener.accept()
            clients[client] = {"data": b"", "stdio": [], "pid": None}
        for client in [c for c in ready if c in clients]:
            state = clients[client]
            data, ancillary, _, _ = client.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
            for level, kind, fds in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    state["stdio"] += array.array("i", fds[:len(fds) - len(fds) % 4]).tolist()
            if not data:  # the client is gone: so is its program
                if state["pid"] is not None:
                    try:
                        os.kill(state["pid"], signal.SIGKILL)
                    except OSError:
                        pass
                    running[state["pid"]] = _GONE  # reaped, its end said to no one
                for fd in state["stdio"]:
                    os.close(fd)
                clients.pop(client)
                client.close()
                continue
            state["data"] += data
            if state["pid"] is not None or b"\n" not in state["data"]:
                continue
            request = json.loads(state["data"].partition(b"\n")[0])
            request["project"] = project
            refusal = _client_refusal(request, len(state["stdio"]), base_env, top, project,
                                      driver_loaded)
            if refusal is None:
                state["pid"] = pid = fork(request, state["stdio"])
                running[pid] = client
                _send(client, {"forked": pid})
            else:
                _send(client, {"refused": refusal})
            for fd in state["stdio"]:
                os.close(fd)
            state["stdio"] = []
        if fd_in not in ready:
            continue
        chunk = os.read(fd_in, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            pid = fork(json.loads(line))
            running[pid] = None
            say({"forked": pid})
    for pid in running:  # the tests are over: what is left ends with the server
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _client_refusal(request, streams, base_env, modules, project, driver_loaded):
    """Why a client's program must start fresh (None: the server may run it)."""
    if streams != 3 + len(request.get("fds") or []):
        return "not every descriptor passed"
    return (project_refusal(request["argv"], request["cwd"], request["env"], project)
            or env_refusal(request["env"], base_env, modules, driver_loaded))


#: The client of a running child that went away: its end is told to no one.
_GONE = object()


def _send(client, message):
    try:
        client.sendall((json.dumps(message) + "\n").encode())
    except OSError:  # the client is gone
        pass


# ---------------------------------------------------------------------------- the test side

class ForkServer:
    """The tests' handle on one server process (started on first use). Several of its
    children may run at once: :meth:`spawn` starts one, :meth:`wait_for` waits for its end."""

    def __init__(self, env):
        self.proc = None
        self.env = dict(env)  # the session's environment, before any test changed it
        self.modules = ()
        self.driver_loaded = True  # until the server says otherwise
        self.project = os.path.realpath(os.path.join(REPO, PROJECT))
        self.lock = threading.Lock()  # one request at a time
        self._ended = threading.Condition()
        self._exits = {}  # pid -> returncode, from the reader thread
        self._forked = None
        self.socket_path = None
        #: CPU seconds (user + system) of every child that has ended, for the tests'
        #: per-test CPU log (conftest.py, OCTCONV_EXP_TEST_CPU_LOG).
        self.served_cpu = 0.0

    def _start(self):
        import tempfile

        # Where forkclient.py asks for a program (torchrun's ranks): a fresh folder each start
        # (removed by close).
        self._socket_dir = tempfile.TemporaryDirectory(prefix="forkserver-")
        self.socket_path = os.path.join(self._socket_dir.name, "socket")
        # "python" for a served program that starts Python programs itself (a joblib sweep's
        # loky workers, loky's popen_loky_posix: [sys.executable, "-m", ...] with its pipes
        # passed on): forkclient.py, which has the server fork them.
        self.client_python = os.path.join(self._socket_dir.name, "python")
        client = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forkclient.py")
        with open(self.client_python, "w") as f:
            f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {shlex.quote(client)} "$@"\n')
        os.chmod(self.client_python, 0o755)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                      self.socket_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     env=self.env, cwd=os.path.dirname(os.path.abspath(__file__)))
        self._forked = queue.Queue()
        with self._ended:  # a server started again: the last one's end is not this one's
            self._exits.pop(None, None)
        hello = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, hello), daemon=True).start()
        try:
            hello = hello.get(timeout=600)
        except queue.Empty:
            hello = {}
        if not hello.get("ready"):
            raise RuntimeError("the run.py fork server did not start")
        self.modules = set(hello["modules"])
        self.project = hello["project"]
        self.driver_loaded = hello["cuda_driver_loaded"]

    def _read(self, proc, hello):
        """The server's lines: its greeting, each child's pid, each child's end."""
        forked = self._forked
        for line in proc.stdout:
            message = json.loads(line)
            if "ready" in message:
                hello.put(message)
            elif "forked" in message:
                with self._ended:  # an earlier child's end under the same (reused) pid
                    self._exits.pop(message["forked"], None)
                forked.put(message["forked"])
            elif "exited" not in message:  # a client's child ended
                with self._ended:
                    self.served_cpu += message["cpu"]
            else:
                with self._ended:
                    self._exits[message["exited"]] = message["returncode"]
                    self.served_cpu += message.get("cpu", 0.0)
                    self._ended.notify_all()
        hello.put({})
        forked.put(None)
        with self._ended:  # the server ended: no child of it will report
            self._exits[None] = None
            self._ended.notify_all()

    def usable(self, env):
        """Whether a run with this environment behaves through the server as it would as a
        fresh ``python run.py`` (see the module's docstring)."""
        return self.refusal(env) is None

    def refusal(self, env, argv=None, cwd=None):
        """Why ``python ARGV`` run in ``cwd`` with this environment must start as a fresh
        process (None: it need not)."""
        if os.environ.get("OCTCONV_EXP_TEST_FORKSERVER", "1") == "0":
            return "OCTCONV_EXP_TEST_FORKSERVER=0"
        if argv is not None:
            refusal = project_refusal(argv, cwd or os.getcwd(), env, self.project)
            if refusal:
                return refusal
        return env_refusal(env, self.env, self.modules or
                           set(name.split(".")[0] for name in PREIMPORT), self.driver_loaded)

    def _running(self):
        """Start the server if it is not running (the caller holds ``self.lock``)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()

    def client_env(self):
        """The environment variable that tells ``forkclient.py`` where this server listens
        (the server started if it is not running)."""
        with self.lock:
            self._running()
            return self._socket_env()

    def _socket_env(self):
        """forkclient.py's variable naming this server's socket (the server is running)."""
        return {"OCTCONV_EXP_TEST_FORKSERVER_SOCKET": self.socket_path}

    def spawn(self, argv, cwd, env, out_path, err_path, file_size_limit=None,
              python_children=False):
        """``python ARGV`` (a script and its arguments, or ``-m MODULE ...``) in a forked
        child writing to those files; its pid (the leader of its own process group).
        ``file_size_limit``: bytes, as ``ulimit -f`` (:func:`_child`). ``python_children``:
        the Python programs it starts (``sys.executable ...``: loky's workers) go through
        forkclient.py, which has this server fork them (a fresh interpreter only where the
        server refuses; the program's environment names the server's socket)."""
        with self.lock:
            self._running()
            request = {"argv": list(argv), "cwd": cwd, "env": env, "stdout": out_path,
                       "stderr": err_path, "project": self.project,
                       "file_size_limit": file_size_limit}
            if python_children:
                request["executable"] = self.client_python
                request["env"] = dict(env, **self._socket_env())
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            try:
                pid = self._forked.get(timeout=60)
            except queue.Empty:
                pid = None
            if pid is None:
                raise RuntimeError("the run.py fork server ended")
            return pid

    def wait_for(self, pid, timeout=None):
        """The child's exit code (subprocess's convention), or None after ``timeout``
        seconds; RuntimeError if the server ended first."""
        with self._ended:
            if not self._ended.wait_for(lambda: pid in self._exits or None in self._exits,
                                        timeout):
                return None
            if pid not in self._exits:
                raise RuntimeError("the run.py fork server ended")
            return self._exits.pop(pid)

    def run(self, argv, cwd, env, timeout, out_path, err_path, file_size_limit=None,
            python_children=False):
        """``python ARGV`` in a forked child; the exit code, or subprocess.TimeoutExpired
        after killing the child's process group."""
        pid = self.spawn(argv, cwd, env, out_path, err_path, file_size_limit, python_children)
        code = self.wait_for(pid, timeout)
        if code is None:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait_for(pid, 60)  # the server reaps it
            raise subprocess.TimeoutExpired(argv, timeout)
        return code

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if self.proc is not None:
            self._socket_dir.cleanup()


if __name__ == "__main__":
    serve(sys.argv[1] if len(sys.argv) > 1 else None)
