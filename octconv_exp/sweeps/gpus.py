"""One GPU per job of a parallel sweep (the joblib launcher runs several jobs at once)."""
import fcntl
import logging
import os

log = logging.getLogger("octconv_exp")


class GpuClaim:
    """A parallel sweep's job (the joblib launcher) takes a GPU of its own: it holds an
    exclusive lock (``fcntl.flock``) on ``<sweep dir>/.gpus/<k>.lock`` while it runs, trying
    GPU ``job number % count`` first and then the others. The operating system releases the
    lock when the job's process ends, however it ends, so a killed job frees its GPU. When
    every GPU is taken (more parallel jobs than GPUs) the job shares GPU ``job number % count``
    and says so."""

    def __init__(self, sweep_dir, job_num):
        self.dir = os.path.join(str(sweep_dir), ".gpus")
        self.job_num = int(job_num)
        self.held = None  # the open lock file of the GPU this job holds
        self.index = None

    def acquire(self, count):
        """The GPU this job runs on, as "cuda:<k>" (count <= 1: "cuda", nothing locked)."""
        if count <= 1:
            return "cuda"
        os.makedirs(self.dir, exist_ok=True)
        first = self.job_num % count
        for k in [(first + i) % count for i in range(count)]:
            f = open(os.path.join(self.dir, f"{k}.lock"), "a+")
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()} job {self.job_num}\n")
            f.flush()
            self.held, self.index = f, k
            return f"cuda:{k}"
        self.index = first
        log.warning("All %d GPUs are taken by this sweep's other jobs: job %d shares GPU %d "
                    "(run fewer jobs at once: hydra.launcher.n_jobs=%d)", count, self.job_num,
                    first, count)
        return f"cuda:{first}"

    def release(self):
        if self.held is not None:
            self.held.close()  # closing the file releases its flock
            self.held = None
