"""Reading pickled NumPy arrays without letting the file run code.

A pickle names the functions that rebuild its objects and the unpickler calls them, so loading
a file from elsewhere with :func:`pickle.load` runs whatever it names (``os.system``,
``builtins.eval``, or a NumPy function such as ``numpy.testing``'s ``runstring``, which calls
``exec``). The feature files of MOSI and MOSEI are pickles of dicts of arrays, so they are read
here by an unpickler that knows an exact list of names, the ones NumPy 1.x and 2.x write for
arrays, dtypes and scalars at every pickle protocol (and Python 2's), plus plain containers.

Even those names are not handed out as the real NumPy functions: a file could call
``numpy.ndarray`` over a buffer of its choosing or give a dtype an inconsistent state. Each name
maps to a stand-in that accepts only what NumPy itself writes and checks it:

* ``numpy.ndarray`` is only a marker for ``_reconstruct``; calling it is refused.
* ``numpy.dtype`` takes a plain type code (bool, integers, floats, complex, bytes, unicode or
  object) and a state that may only set the byte order; structured, void and datetime dtypes
  are refused.
* ``_reconstruct`` plus its state, and ``_frombuffer`` (protocol 5), give an array built here
  with :func:`numpy.frombuffer` after checking that the buffer has exactly the bytes the shape
  and dtype need. An object array takes its items from a list, never from raw bytes.
* ``scalar`` gives the Python value of a non-object scalar of exactly one item's bytes.
* ``_codecs.encode`` (how protocols 0-2 store bytes) only encodes text as latin-1, ``bytes``
  only makes the empty bytes, ``bytearray`` only copies bytes.

Stand-ins for arrays, dtypes and scalars are placeholders that the loaded tree holds until the
end; :func:`load_arrays` then swaps every one for its value. Anything else fails with
:class:`UnsafePickleError` naming what was refused.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

#: Type codes NumPy writes for the dtypes accepted here (``kind`` + item size in bytes, or
#: characters for unicode).
_DTYPE_CODE = re.compile(r"(b1|[iu](1|2|4|8)|f(2|4|8|12|16)|c(8|16|24|32)|[SU]\d{1,9}|O(4|8))")
_BYTE_ORDERS = ("<", ">", "|", "=")
_MAX_DIMS = 32


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names or does something that array files never need."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsafePickleError(message)


def _as_bytes(data: Any, what: str) -> bytes | bytearray:
    """Raw data as bytes; Python 2 strings arrive as latin-1 text (``encoding="latin1"``)."""
    if isinstance(data, str):
        return data.encode("latin1")
    _require(isinstance(data, bytes | bytearray), f"{what} is a {type(data).__name__}, not bytes")
    return data


def _shape(value: Any) -> tuple[int, ...]:
    _require(
        isinstance(value, tuple)
        and len(value) <= _MAX_DIMS
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value),
        f"array shape {value!r} is not a tuple of sizes",
    )
    return value


class _Placeholder:
    """What a stand-in returns: its value is swapped in once loading has finished."""

    def value(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"a {type(self).__name__[1:]} takes no state")


class _Dtype(_Placeholder):
    """``numpy.dtype(code, align, copy)`` plus the byte order from its state."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        _require(
            isinstance(code, str) and _DTYPE_CODE.fullmatch(code) is not None,
            f"dtype {code!r} is not a plain numeric, bytes, unicode or object type",
        )
        _require(align in (0, 1) and copy in (0, 1), "dtype flags must be booleans")
        self.dtype = np.dtype(code)
        self.has_state = False

    def __setstate__(self, state: Any) -> None:
        _require(not self.has_state, "a dtype was given its state twice")
        _require(
            isinstance(state, tuple) and len(state) == 8 and state[0] == 3,
            "dtype state is not NumPy's (version 3, 8 items)",
        )
        _, order, subarray, names, fields, elsize, _alignment, _flags = state
        _require(order in _BYTE_ORDERS, f"dtype byte order {order!r} is invalid")
        _require(
            subarray is None and names is None and fields is None,
            "structured and sub-array dtypes are refused",
        )
        _require(isinstance(elsize, int), "dtype item size is not an integer")
        dtype = self.dtype.newbyteorder(order) if order in ("<", ">") else self.dtype
        _require(
            elsize in (-1, 0, dtype.itemsize),
            f"dtype {dtype.str} with item size {elsize} is inconsistent",
        )
        self.dtype, self.has_state = dtype, True

    def value(self) -> np.dtype:
        return self.dtype


def _dtype_of(value: Any) -> np.dtype:
    _require(isinstance(value, _Dtype), f"a {type(value).__name__} given where a dtype belongs")
    return value.value()


def _array_from_data(data: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> Any:
    """A fresh array of ``shape`` from raw bytes or, for object arrays, a list of items."""
    count = math.prod(shape)
    order = "F" if fortran else "C"
    if dtype.hasobject:  # NumPy lists the items in C order whatever the array's layout
        _require(isinstance(data, list), "an object array's items must come as a list")
        _require(len(data) == count, f"{len(data)} items for an object array of shape {shape}")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(data):
            out[i] = _finish(item, {})
        return out.reshape(shape)
    raw = _as_bytes(data, "array data")
    _require(
        len(raw) == count * dtype.itemsize,
        f"{len(raw)} bytes for an array of shape {shape} and dtype {dtype.str}",
    )
    if count == 0:
        return np.empty(shape, dtype=dtype, order=order)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order=order)


class _Global:
    """What :data:`ALLOWED` hands the unpickler for a name: a checked stand-in, never the real
    function or class, and an object that takes no state (a ``BUILD`` on it is refused)."""

    __slots__ = ("func", "name")

    def __init__(self, name: str, func: Callable[..., Any] | None) -> None:
        self.name, self.func = name, func

    def __call__(self, *args: Any) -> Any:
        _require(self.func is not None, f"calling {self.name} is refused")
        return self.func(*args)  # type: ignore[misc]

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"setting the state of {self.name} is refused")


#: ``numpy.ndarray``: only the first argument of ``_reconstruct``.
_NDARRAY = _Global("numpy.ndarray", None)


class _Array(_Placeholder):
    """``_reconstruct(numpy.ndarray, (0,), b"b")`` and then its state, or a finished array."""

    def __init__(self, array: np.ndarray | None = None) -> None:
        self.array = array

    def __setstate__(self, state: Any) -> None:
        _require(self.array is None, "an array was given its state twice")
        if isinstance(state, tuple) and len(state) == 4:  # NumPy before 1.0 had no version
            state = (1, *state)
        _require(
            isinstance(state, tuple) and len(state) == 5 and state[0] == 1,
            "array state is not NumPy's (version 1, 5 items)",
        )
        _, shape, dtype, fortran, data = state
        _require(isinstance(fortran, bool | int), "array order flag is not a bool")
        self.array = _array_from_data(data, _dtype_of(dtype), _shape(shape), bool(fortran))

    def value(self) -> np.ndarray:
        _require(self.array is not None, "an array was never given its data")
        return self.array


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _Array:
    _require(subtype is _NDARRAY, "_reconstruct is only accepted for numpy.ndarray")
    _require(shape == (0,) and typecode in (b"b", "b"), "_reconstruct arguments are not NumPy's")
    return _Array()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    _require(order in ("C", "F"), f"array order {order!r} is invalid")
    real = _dtype_of(dtype)
    _require(not real.hasobject, "an object array cannot come from raw bytes")
    return _Array(_array_from_data(buffer, real, _shape(shape), order == "F"))


class _Scalar(_Placeholder):
    def __init__(self, item: Any) -> None:
        self.item = item

    def value(self) -> Any:
        return self.item


def _scalar(dtype: Any, data: Any = None) -> _Scalar:
    real = _dtype_of(dtype)
    _require(not real.hasobject, "object scalars are refused")
    raw = _as_bytes(data, "scalar data")
    _require(len(raw) == real.itemsize, f"{len(raw)} bytes for a {real.str} scalar")
    return _Scalar(np.frombuffer(raw, dtype=real, count=1)[0].item())


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as protocols 0-2 use it: bytes stored as latin-1 text."""
    _require(isinstance(text, str), "_codecs.encode is only accepted on text")
    _require(encoding in ("latin1", "latin-1"), f"_codecs.encode with {encoding!r} is refused")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    _require(not args, "bytes(...) is only accepted without arguments (the empty bytes)")
    return b""


def _bytearray(data: Any = b"", encoding: Any = "latin-1") -> bytearray:
    _require(encoding in ("latin1", "latin-1"), f"bytearray with {encoding!r} is refused")
    return bytearray(_as_bytes(data, "bytearray data"))


_NUMPY_1, _NUMPY_2 = "numpy.core", "numpy._core"
#: Python 2 pickles, and Python 3 ones of protocols 0-2, name the builtins ``__builtin__``.
_BUILTINS = ("builtins", "__builtin__")


def _allowed() -> dict[tuple[str, str], _Global]:
    names: dict[tuple[str, str], Callable[..., Any] | None] = {
        ("numpy", "ndarray"): None,
        ("numpy", "dtype"): _Dtype,
        ("collections", "OrderedDict"): OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in (_NUMPY_1, _NUMPY_2):
        names[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        names[(f"{core}.numeric", "_frombuffer")] = _frombuffer
        names[(f"{core}.multiarray", "scalar")] = _scalar
    for builtins in _BUILTINS:
        names[(builtins, "set")] = set
        names[(builtins, "frozenset")] = frozenset
        names[(builtins, "bytearray")] = _bytearray
        names[(builtins, "bytes")] = _empty_bytes
    out = {key: _Global(".".join(key), func) for key, func in names.items()}
    out[("numpy", "ndarray")] = _NDARRAY
    return out


#: Every global a pickle of arrays and plain containers needs (NumPy 1.x and 2.x, Python 2 and
#: 3, protocols 0-5), each mapped to its checked stand-in.
ALLOWED: dict[tuple[str, str], _Global] = _allowed()


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that knows only :data:`ALLOWED`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id")


def _finish(obj: Any, done: dict[int, Any]) -> Any:
    """``obj`` with every placeholder swapped for its value (containers are rebuilt)."""
    key = id(obj)
    if key in done:
        return done[key]
    if isinstance(obj, _Placeholder):
        out: Any = obj.value()
    elif isinstance(obj, dict):
        out = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        done[key] = out
        for k, v in obj.items():
            out[_finish(k, done)] = _finish(v, done)
    elif isinstance(obj, list):
        out = []
        done[key] = out
        out.extend(_finish(v, done) for v in obj)
    elif isinstance(obj, tuple | set | frozenset):
        out = type(obj)(_finish(v, done) for v in obj)
    else:
        out = obj
    done[key] = out
    return out


def load_arrays(data: bytes) -> Any:
    """Unpickle ``data``, which may hold only NumPy arrays, scalars and plain containers.

    Raises :class:`UnsafePickleError` for anything else, and the usual unpickling errors for a
    damaged file. Python 2 pickles are read with ``encoding="latin1"``, as NumPy requires.
    """
    loaded = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    return _finish(loaded, {})
