"""summary.tex: a sweep's configurations as a booktabs table (mean ± std over seeds and the
95 % confidence interval of the mean), ready for ``\\input`` in a paper."""

#: LaTeX's special characters in text mode, and what typesets each as itself.
_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
            "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
            "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
            "|": r"\textbar{}", "±": r"\ensuremath{\pm}", "α": r"\ensuremath{\alpha}",
            "—": "--"}


def escape(text):
    """``text`` typeset as written (every character LaTeX would read as a command escaped)."""
    return "".join(_SPECIAL.get(c, c) for c in str(text))


def number(value, digits):
    return "--" if value is None else f"{value:.{digits}f}"


def mean_std(mean, std, digits):
    """``79.31 $\\pm$ 0.42``; the mean alone for a single run; ``--`` without one."""
    if mean is None:
        return "--"
    return number(mean, digits) + (rf" $\pm$ {number(std, digits)}" if std is not None else "")


def interval(mean, half, digits):
    """``[78.79, 79.83]``, the 95 % confidence interval; ``--`` for fewer than two runs."""
    if mean is None or half is None:
        return "--"
    return f"[{number(mean - half, digits)}, {number(mean + half, digits)}]"


def table(columns, rows, caption, label="tab:sweep"):
    """A ``table`` float holding a booktabs ``tabular``: ``columns`` are ``(heading (LaTeX),
    alignment)``, ``rows`` lists of cells already in LaTeX, ``caption`` plain text."""
    lines = ["% Needs \\usepackage{booktabs}. Written by python -m octconv_exp.report.",
             r"\begin{table}[t]", r"  \centering",
             rf"  \caption{{{escape(caption)}}}", rf"  \label{{{label}}}",
             r"  \begin{tabular}{" + "".join(a for _, a in columns) + "}", r"    \toprule",
             "    " + " & ".join(h for h, _ in columns) + r" \\", r"    \midrule"]
    lines += ["    " + " & ".join(cells) + r" \\" for cells in rows]
    lines += [r"    \bottomrule", r"  \end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"
