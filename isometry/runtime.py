"""One thread for the LAPACK calls inside XLA programs on the CPU.

On the CPU, jaxlib runs its linear-algebra custom calls (the QR that draws
orthogonal weights, ``jnp.linalg.svd``, ``eigh``) through the OpenBLAS that
numpy and scipy ship. OpenBLAS starts one thread per core and lets them
spin while they wait; inside an XLA program, whose own thread pool already
uses every core, those threads compete with XLA's and with each other. A
batch of QR decompositions under ``vmap`` (an orthogonal layer of several
sweep points at once) then runs tens to hundreds of times slower than with
one OpenBLAS thread; BENCHMARKS.md ("LAPACK threads") has the numbers.
XLA's own matmuls do not go through OpenBLAS and are not affected.

The ``isometry`` command and :func:`isometry.paper_figures.core.make` run
under :func:`lapack_threads`; a script of your own that draws orthogonal
weights or takes SVDs in jitted code can do the same::

    from isometry import runtime

    with runtime.lapack_threads(1):
        ...  # jitted work calling LAPACK

or set ``OPENBLAS_NUM_THREADS=1`` before Python starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

from isometry import validate

__all__ = ["lapack_threads"]


@contextlib.contextmanager
def lapack_threads(n: int = 1) -> Iterator[None]:
    """Limit the BLAS/LAPACK libraries loaded in this process (OpenBLAS, MKL, BLIS) to ``n``
    threads for the ``with`` block; the previous limits are restored after it.

    Results do not change: the same LAPACK routines run, on fewer threads.
    """
    validate.positive_int("n", n)
    with threadpool_limits(limits=n, user_api="blas"):
        yield
