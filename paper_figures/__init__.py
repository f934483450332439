"""Paper figures: one script per figure, each reading (or computing and caching) its results.

Every figure module defines

    TIERS: dict[str, dict]       # "tiny" (tests), "quick" (a laptop), "full" (papers' sizes)
    compute(**params) -> dict    # arrays; the experiment (or theory) the figure shows
    plot(data, params) -> Figure # no computation

and its docstring's first line is the caption: what the figure shows and which paper it
reproduces. ``isometry figures [NAMES...] --tier quick|full`` and ``python -m paper_figures``
regenerate them (see :func:`paper_figures.core.make`).
"""

FIGURES = {
    "phase_diagram": "paper_figures.fig01_phase_diagram",
    "depth_scales": "paper_figures.fig02_depth_scales",
}

__all__ = ["FIGURES"]
