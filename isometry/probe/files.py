"""The probe's files and factories, for the ``isometry probe`` command.

:func:`save` writes ``probe.json`` and ``probe.npz`` (atomically, with the
mode a plain ``open()`` gives); :func:`load_factory` imports the user's model
factory named ``"module:name"`` or ``"file.py:name"``.
"""

from __future__ import annotations

from collections.abc import Callable

from isometry.cuts import ProbeError
from isometry.probe.signal import BACKWARD, FORWARD, ProbeSignal
from isometry.probe.spectra import ProbeSpectra

__all__ = ["load_factory", "save"]


def load_factory(spec: str) -> Callable:
    """The callable named by ``"package.module:name"`` or ``"path/to/file.py:name"``.

    Raises:
        ProbeError: the text has no ``:``, the module or file cannot be
            imported, or it has no callable of that name (the message names it).
    """
    import importlib
    import importlib.util
    from pathlib import Path

    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise ProbeError(f"factory must be MODULE:NAME or FILE.py:NAME, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            loc = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if loc is None or not Path(module_name).is_file():
                raise FileNotFoundError(f"no file {module_name}")
            module = importlib.util.module_from_spec(loc)
            loc.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:  # any failure of the user's import is reported with its name
        raise ProbeError(
            f"cannot import the factory {spec!r}: {type(err).__name__}: {err}"
        ) from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ProbeError(f"the factory {spec!r}: {module_name} has no callable named {attr!r}")
    return factory


def save(
    out, sig: ProbeSignal | None = None, spec: ProbeSpectra | None = None, theory=None
) -> list:
    """Write ``out/probe.json`` (per-block rows and summaries) and ``out/probe.npz`` (spectra).

    The npz holds ``cumulative_<l>``/``local_<l>`` (and ``*_weights_<l>`` for
    SLQ) for block ``l``, with the per-block statistics under their field names;
    ``theory`` (the dict of :func:`theory`) adds its per-block predictions to the JSON
    (``"theory"``) and to the npz (``theory_<field>``).
    """
    from pathlib import Path

    from isometry import atomic

    out = Path(out)
    doc, arrays = {}, {}
    if sig is not None:
        doc["signal"] = sig.rows()
        doc["grad_input_sq"], doc["loss"] = float(sig.grad_input_sq), float(sig.loss)
        arrays |= {f: getattr(sig, f) for f in (*FORWARD, *BACKWARD)}
    if spec is not None:
        doc["spectra"] = {"method": spec.method, "index": spec.index, "paths": spec.paths,
                          "dims": spec.dims, "cumulative": spec.cumulative_summary,
                          "local": spec.local_summary,
                          "cumulative_w1_bound": spec.cumulative_w1_bound,
                          "local_w1_bound": spec.local_w1_bound}  # fmt: skip
        for name in ("cumulative", "local"):
            weights = getattr(spec, f"{name}_weights")
            for i, v in enumerate(getattr(spec, name)):
                arrays[f"{name}_{i}"] = v
                if weights is not None:
                    arrays[f"{name}_weights_{i}"] = weights[i]
    if theory is not None:
        fields = {k: v for k, v in theory.items() if k not in ("theory", "absolute")}
        doc["theory"] = {"absolute": bool(theory.get("absolute", False)),
                         **{k: [float(x) for x in v] for k, v in fields.items()}}  # fmt: skip
        arrays |= {f"theory_{k}": v for k, v in fields.items()}
    return [
        atomic.write_json(out / "probe.json", doc),
        atomic.write_npz(out / "probe.npz", **arrays),
    ]
