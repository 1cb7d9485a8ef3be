"""Confidence intervals of a configuration's mean over its seeds, without scipy (not a
dependency): Student's t quantiles from a table, an expansion beyond it."""
import math
import statistics

#: Two-sided 95 %: the 0.975 quantile of Student's t for 1 to 30 degrees of freedom.
T_975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851,
         2.364624252, 2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830,
         2.160368656, 2.144786688, 2.131449546, 2.119905299, 2.109815578, 2.100922040,
         2.093024054, 2.085963447, 2.079613845, 2.073873068, 2.068657610, 2.063898562,
         2.059538553, 2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456)
Z_975 = 1.959963984540054


def t_975(df):
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, not {df}")
    if df <= len(T_975):
        return T_975[int(df) - 1]
    # Beyond the table the normal quantile alone is up to 4 % too narrow (df 31); the
    # Cornish-Fisher terms bring it within 2e-6 of the exact quantile (scipy.stats.t).
    z, v = Z_975, float(df)
    return (z + (z ** 3 + z) / (4 * v) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * v ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * v ** 3))


def ci95_half_width(values):
    """Half the width of the 95 % confidence interval of the mean of ``values`` (mean ±
    this), from Student's t; None for fewer than two values."""
    values = list(values)
    if len(values) < 2:
        return None
    return t_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
