"""Register tacq_kernels with transformers in processes that never ``import tacq_kernels``.

Installed as ``tacq_kernels_autoload.pth`` next to the package, so :func:`install` runs at every
interpreter start-up in that environment. It only puts a one-shot finder at the front of
``sys.meta_path`` (standard library only: no torch, no transformers, no Triton, nothing read
from disk). The finder watches for the ``transformers.quantizers`` package; right after that
package has executed (transformers imports it before it reads any ``quantization_config``), the
finder removes itself and

* by default imports ``tacq_kernels``, which registers the ``tacq_kernels`` checkpoint format, so
  ``AutoModelForCausalLM.from_pretrained(checkpoint)`` loads the quantized layers in lm-eval,
  pipelines, notebooks and every other tool that never imports us;
* with ``TACQ_KERNELS_AUTOLOAD=0`` (the off switch) imports nothing and registers a placeholder
  for the format instead: loading a tacq_kernels checkpoint then raises an error saying to
  ``import tacq_kernels``, instead of transformers' silent fallback (a warning, then random
  weights for every quantized layer). ``import tacq_kernels`` replaces the placeholder.

If importing tacq_kernels fails, the error is reported once on stderr and the placeholder is
registered (its message names the failure); transformers itself carries on. Nothing here can
make interpreter start-up or ``import transformers`` fail. Why a ``.pth`` file and not torch's
``torch.backends`` entry points: docs/integrations.md.
"""

from __future__ import annotations

import os
import sys

ENV_VAR = "TACQ_KERNELS_AUTOLOAD"
TARGET = "transformers.quantizers"
QUANT_METHOD = "tacq_kernels"  # = tacq_kernels.format.QUANT_METHOD (not imported: it would load torch)

#: set once the hook has run in this process: "registered", "placeholder" or "failed: ..."
outcome: str | None = None


def enabled() -> bool:
    """False when ``TACQ_KERNELS_AUTOLOAD`` is ``0`` (or ``false``/``no``/``off``)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


class _Finder:
    """A meta-path finder that only ever answers for ``transformers.quantizers``.

    It finds that package's spec with the finders after it, wraps the spec's loader so that
    :func:`_on_quantizers_loaded` runs right after the package executed, and takes itself off
    ``sys.meta_path``. Every other import costs one string comparison.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader)
        return spec

    def __repr__(self):
        return f"<tacq_kernels_autoload finder for {TARGET}>"


class _Loader:
    """Delegates to transformers' own loader; runs the hook after ``exec_module``."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)  # transformers' errors are transformers' to raise
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        _uninstall()
        _on_quantizers_loaded()

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code, ...
        return getattr(self._loader, name)


_FINDER = _Finder()


def install() -> None:
    """Called by ``tacq_kernels_autoload.pth`` at start-up; never raises."""
    try:
        if TARGET in sys.modules:  # installed late (by hand): transformers is already there
            _on_quantizers_loaded()
        elif _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    except Exception as e:  # noqa: BLE001 - start-up must never fail because of us
        _report(e)


def _uninstall() -> None:
    try:
        sys.meta_path.remove(_FINDER)
    except ValueError:
        pass


def _on_quantizers_loaded() -> None:
    global outcome
    if outcome is not None:
        return
    if not enabled():
        outcome = "placeholder"
        reason = (f"the automatic registration is off ({ENV_VAR}={os.environ.get(ENV_VAR)}): add "
                  f"`import tacq_kernels` before loading it, or unset {ENV_VAR}")
    else:
        try:
            import tacq_kernels  # noqa: F401  (its import registers the format)

            outcome = "registered"
            return
        except Exception as e:  # noqa: BLE001 - reported, and loading such a checkpoint will say why
            outcome = f"failed: {type(e).__name__}: {e}"
            _report(e)
            reason = (f"importing tacq_kernels failed ({type(e).__name__}: {e}): run "
                      "`python -c 'import tacq_kernels'` to see why, and fix the installation")
    try:
        register_placeholder(reason)
    except Exception as e:  # noqa: BLE001
        _report(e)


def _report(error: BaseException) -> None:
    try:
        sys.stderr.write(
            f"tacq_kernels_autoload: could not register tacq_kernels with transformers "
            f"({type(error).__name__}: {error}); tacq_kernels checkpoints will not load until "
            f"`import tacq_kernels` works (set {ENV_VAR}=0 to skip the automatic import)\n"
        )
    except Exception:  # noqa: BLE001 - no stderr: stay silent rather than fail
        pass


def register_placeholder(reason: str) -> bool:
    """Register a ``tacq_kernels`` quantization config that refuses to load, saying ``reason``
    (why the real one is missing and what to do).

    transformers then raises ``RuntimeError`` on a tacq_kernels checkpoint instead of warning
    and initialising the quantized layers at random. Does nothing (returns False) when the
    format is already registered; ``tacq_kernels.register_with_transformers`` replaces it.
    """
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        return False
    message = (
        f"this is a tacq_kernels checkpoint (quantization_config.quant_method = '{QUANT_METHOD}') "
        f"but {reason}. (Without tacq_kernels, transformers would initialise every quantized "
        "layer at random.)"
    )

    class TacqKernelsNotLoaded(QuantizationConfigMixin):
        """Placeholder for the tacq_kernels format: building it raises (see the message)."""

        tacq_kernels_placeholder = True

        def __init__(self, *args, **kwargs):
            raise RuntimeError(message)

    AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = TacqKernelsNotLoaded
    return True
