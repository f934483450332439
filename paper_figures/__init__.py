"""Paper figures: one script per figure, each reading (or computing and caching) its results.

Every figure module ``paper_figures/figNN_<name>.py`` defines::

    TIERS: dict[str, dict]       # "tiny" (tests), "quick" (a laptop), "full" (papers' sizes)
    KEYS: tuple[str, ...]        # the arrays compute() returns (checked by the tests)
    compute(**params) -> dict    # arrays; the experiment (or theory) the figure shows
    plot(data, params) -> Figure # no computation

and its docstring's first line is the caption: what the figure shows and which paper it
reproduces. An optional ``COST = {"quick": seconds}`` (one CPU core, from empty stores) lets
``isometry figures --jobs N`` start the longest figures first.
Modules are discovered (ordered by ``NN``), so a new figure is one new module.
``isometry figures [NAMES...] --tier quick|full`` and ``python -m isometry.paper_figures``
regenerate them (see :func:`isometry.paper_figures.core.make`).

A ``compute`` that runs an experiment passes its ``EXPERIMENT`` to
``experiments.harness.stored_run`` with ``progress=core.progress_enabled()``, so
``isometry figures`` shows its points, and reads the results on the experiment's grid
(``run.array(column, axes)``).
"""

import pkgutil
import re

_PATTERN = re.compile(r"fig(\d\d)_(\w+)$")


def _discover() -> dict[str, str]:
    """``{name: module path}`` of the ``figNN_<name>`` modules here, ordered by ``NN``."""
    found = []
    for m in pkgutil.iter_modules(__path__):
        match = _PATTERN.match(m.name)
        if match:
            found.append((int(match.group(1)), match.group(2), f"{__name__}.{m.name}"))
    return {name: module for _, name, module in sorted(found)}


FIGURES = _discover()

__all__ = ["FIGURES"]
