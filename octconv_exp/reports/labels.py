"""Labels beside the points of a figure, moved apart where they would overlap.

A deterministic greedy placement, no dependency: the labels are placed one after another
(in the order of their points), each at the first of a fixed list of positions around its
point, nearest first, that covers no label placed before it, no point and not the legend,
and stays inside the axes; where every position is taken, the one that covers least. A label
placed away from its point gets a thin line to it.

matplotlib is imported where a figure is drawn, not with this module: the sweep report's
callback (and with it this module) is loaded by every run and every launcher worker, most of
which draw nothing.
"""
#: Space between a point and its label, and around a point's marker (points, 1/72 inch).
GAP_PT = 3.0
MARKER_RADIUS_PT = 4.0
#: How many rings of positions (each a label's height further out) are tried.
RINGS = 8


def renderer_of(fig):
    """A renderer for ``fig`` (an Agg canvas is attached to a bare Figure first)."""
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # deferred: matplotlib is slow to import and only the plots need it
    )

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def freeze_legend(ax, renderer):
    """Pin a ``loc='best'`` legend where it is now: labels placed afterwards would make
    'best' pick another place (matplotlib >= 3.8 counts texts) and the legend could land on
    them."""
    legend = ax.get_legend()
    if legend is None:
        return None
    box = legend.get_window_extent(renderer).transformed(ax.transAxes.inverted())
    legend.set_bbox_to_anchor((box.x0, box.y0), transform=ax.transAxes)
    legend.borderaxespad = 0  # the anchor is where the legend's corner is, padding included
    if hasattr(legend, "set_loc"):
        legend.set_loc("lower left")
    else:  # matplotlib < 3.8 (the SDK's 3.7) has no setter
        legend._loc = 3
    return legend.get_window_extent(renderer)


def _candidates(width, height, gap):
    """Lower-left corners of a label's box relative to its point (pixels), nearest first;
    ``gap``: the first ring's distance (clear of the point's own marker)."""
    for ring in range(RINGS):
        d = gap + ring * height
        yield ring, (d, d / 2)                      # right, above
        yield ring, (d, -height - d / 2)            # right, below
        yield ring, (-width - d, d / 2)             # left, above
        yield ring, (-width - d, -height - d / 2)   # left, below
        yield ring, (-width / 2, d)                 # above
        yield ring, (-width / 2, -height - d)       # below
        yield ring, (d, -height / 2)                # right
        yield ring, (-width - d, -height / 2)       # left


def _overlap(a, b):
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _outside(box, frame):
    inside = _overlap(box, frame)
    return box.width * box.height - inside


def place_labels(ax, points, fontsize=7):
    """Annotate ``points`` (``[(x, y, text, colour)]`` in data coordinates) on ``ax``, call
    after the layout is final; returns the annotations, in the order of ``points``."""
    from matplotlib.transforms import Bbox  # deferred: slow to import (module docstring)

    fig = ax.figure
    renderer = renderer_of(fig)
    taken = []
    legend_box = freeze_legend(ax, renderer)
    if legend_box is not None:
        taken.append(legend_box)
    px_per_pt = fig.dpi / 72.0
    radius = MARKER_RADIUS_PT * px_per_pt
    anchors = [ax.transData.transform((x, y)) for x, y, _, _ in points]
    taken += [Bbox.from_extents(px - radius, py - radius, px + radius, py + radius)
              for px, py in anchors]
    frame = ax.get_window_extent(renderer)
    gap, margin = (GAP_PT + MARKER_RADIUS_PT) * px_per_pt, 1.0
    placed = [None] * len(points)
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], points[i][2], i))
    for i in order:
        x, y, text, color = points[i]
        px, py = anchors[i]
        probe = ax.text(x, y, text, fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        width, height = extent.width + 2 * margin, extent.height + 2 * margin
        best = None
        for ring, (dx, dy) in _candidates(width, height, gap):
            box = Bbox.from_bounds(px + dx, py + dy, width, height)
            # Leaving the axes is worse than covering a little of something.
            cost = sum(_overlap(box, t) for t in taken) + 4 * _outside(box, frame)
            if best is None or cost < best[0]:
                best = (cost, ring, dx, dy, box)
            if cost == 0:
                break
        _, ring, dx, dy, box = best
        taken.append(box)
        ann = ax.annotate(
            text, (x, y), xytext=((dx + margin) / px_per_pt, (dy + margin) / px_per_pt),
            textcoords="offset points", ha="left", va="bottom", fontsize=fontsize, color=color,
            arrowprops=(dict(arrowstyle="-", color=color, lw=0.5, shrinkA=0, shrinkB=2)
                        if ring > 0 else None))
        ann.set_in_layout(False)
        placed[i] = ann
    return placed
