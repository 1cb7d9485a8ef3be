"""Figures as files: one file a format, each written atomically, vector files the same bytes
for the same figure. The sweep report's plots (``report.format``) and each run's confusion
matrix (``report.confusion_format``) are saved through here."""
import contextlib
import logging

from .outputs import atomic_write

#: Vector files keep text as text (svg: <text> elements; pdf: TrueType, as journals ask,
#: not Type 3) and are the same bytes for the same figure (no dates, fixed SVG ids).
SAVE_RC = {"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "octconv-exp"}
SAVE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


@contextlib.contextmanager
def font_subsetting_quiet():
    """fontTools' INFO lines held back while figures are saved: matplotlib subsets each PDF's
    fonts with fontTools, which logs every table it prunes at INFO, and under Hydra's INFO
    root logger that is a hundred lines after every sweep. Its warnings still show."""
    logger = logging.getLogger("fontTools")
    level = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def save(fig, stem, formats, dpi):
    """``fig`` as ``stem.<format>`` for each of ``formats`` (PNG at ``dpi``), each atomically,
    under :data:`SAVE_RC` (which matplotlib reads when it saves) and
    :func:`font_subsetting_quiet`; returns the paths written, in the order of ``formats``."""
    import matplotlib  # deferred: slow to import, and only what draws needs it

    written = []
    with matplotlib.rc_context(SAVE_RC), font_subsetting_quiet():
        for fmt in formats:
            path = f"{stem}.{fmt}"
            atomic_write(path, lambda f, fmt=fmt: fig.savefig(
                f, format=fmt, dpi=dpi, metadata=SAVE_METADATA.get(fmt)))
            written.append(path)
    return written
