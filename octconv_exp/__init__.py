"""octconv-exp: a Hydra-configured experiment framework for Octave Convolution."""
import warnings

from .version import __version__

__all__ = ["__version__", "load_model", "LoadedModel"]

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml deliberately take the place of
# the launcher plugins' configs of the same names, to carry our defaults; Hydra still validates
# them against the plugins' schemas and warns that it does, in every process (parallel workers
# too: they import this package before they load their job's config).
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")


def __getattr__(name):
    # load_model needs torch: imported on first use, so that `import octconv_exp` (every
    # Hydra job and sweep worker does it) stays light.
    if name in ("load_model", "LoadedModel"):
        from .deploy import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
