"""octconv-exp: a Hydra-configured experiment framework for Octave Convolution."""
import warnings

__version__ = "0.1.0"

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml deliberately take the place of
# the launcher plugins' configs of the same names, to carry our defaults; Hydra still validates
# them against the plugins' schemas and warns that it does, in every process (parallel workers
# too: they import this package before they load their job's config).
warnings.filterwarnings("ignore", message="(?s).*is validated against ConfigStore schema with the same name")
