"""Restricted unpickling for data files we did not write (OpenGait ``.pkl``, dataset pickles).

``pickle.load`` runs arbitrary code named by the file. :func:`restricted_load` only lets the file
reference the globals the caller allows; anything else raises :class:`UnsafePickleError` naming the file
and the forbidden global, before any of it is imported or called.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import IO, Any

from kpt.errors import DataError

#: Globals that plain numpy arrays need (numpy 1.x and 2.x module paths).
NUMPY_ARRAY_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
})

#: Harmless builtins that pickles of plain containers may reference.
BUILTIN_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "range"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("collections", "OrderedDict"),
})


class UnsafePickleError(pickle.UnpicklingError, DataError):
    """The pickle referenced a global outside the allowed set.

    Also a :class:`kpt.errors.DataError`: the file is the user's, so the CLI shows one line.
    """


class CorruptPickleError(pickle.UnpicklingError, DataError):
    """The bytes are not a valid pickle (truncated, zero bytes, another format); names the file."""


InvalidPickleError = CorruptPickleError  # one class, two names in use


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], allowed: set[tuple[str, str]], what: str,
                 encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._what = what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnsafePickleError(
                f"{self._what}: refusing to unpickle the global {module}.{name}; this file may run "
                f"code. Allowed globals: {', '.join(sorted(f'{m}.{n}' for m, n in self._allowed))}")
        return super().find_class(module, name)


def restricted_load(fileobj_or_bytes: IO[bytes] | bytes | bytearray | memoryview,
                    allowed: Iterable[tuple[str, str]] = (), what: str = "pickle",
                    encoding: str = "ASCII") -> object:
    """Unpickle allowing only the ``(module, name)`` globals in ``allowed``.

    Args:
        fileobj_or_bytes: an open binary file or the pickle bytes.
        allowed: permitted globals, e.g. ``NUMPY_ARRAY_GLOBALS`` for files of numpy arrays.
        what: the file name (or description) used in error messages.
        encoding: how Python 2 ``str`` objects are decoded (``pickle.Unpickler``'s argument;
            ``"bytes"`` keeps them as bytes, as insightface's ``.bin`` loader retries with).

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the pickle names a global not in ``allowed``.
        CorruptPickleError: the data is not a valid pickle (message names ``what``); a
            ``pickle.UnpicklingError`` and a :class:`kpt.errors.DataError`.
    """
    if isinstance(fileobj_or_bytes, (bytes, bytearray, memoryview)):
        fileobj: IO[bytes] = io.BytesIO(bytes(fileobj_or_bytes))
    else:
        fileobj = fileobj_or_bytes
    try:
        return _RestrictedUnpickler(fileobj, set(allowed), what, encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptPickleError(f"{what}: not a valid pickle ({type(exc).__name__}: {exc})") \
            from exc
