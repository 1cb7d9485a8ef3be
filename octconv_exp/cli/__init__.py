"""The command line around Hydra, the top layer. ``preflight``: what happens before Hydra starts
(argv checks, quoting, recorded groups, output-dir checks); ``outcome``: what a run's end
becomes (exit code, one line, records); ``validate``: ``python -m octconv_exp.validate``. May
import every other subpackage.
"""
