"""A file format for tensors and plain data that cannot carry code.

Checkpoints are data from wherever a user points us, so reading one must never run code: no pickle,
not even PyTorch's restricted one (docs/reliability.md, "What is trusted, and what is data."). A
file is the safetensors layout, which any safetensors reader opens:

    8 bytes   header length N, unsigned little-endian
    N bytes   JSON: {name: {"dtype", "shape", "data_offsets": [begin, end]}, ..., "__metadata__": {...}}
              (padded with spaces to a multiple of 8)
    the rest  the tensors' bytes, back to back

The metadata holds ``format``, ``version``, ``state`` and ``sha256``. The state around the tensors
(numbers, strings, lists, nested dicts, tuples, dicts with integer keys as in an optimizer's state)
is JSON in its ``state`` entry, each tensor replaced by ``{"$tensor": name}`` (numpy arrays by
``{"$ndarray": name}``), tuples by ``{"$tuple": [...]}`` and dicts whose keys are not all plain
strings (or start with ``$``) by ``{"$dict": [[key, value], ...]}``. Reading builds only those
types: an unknown tag, dtype or layout is an error, never a call.

``sha256`` covers the tensor index, the state and the bytes, so a torn or altered file is detected;
it guards against accidents, not attackers, so the format itself must be harmless.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct

import numpy as np
import torch

FORMAT = "distmeta-tensorfile"
VERSION = "1"
MAX_HEADER = 100 * 2**20  # safetensors' own limit: a larger header is a corrupt or hostile file

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
TAGS = ("$tensor", "$ndarray", "$tuple", "$dict")


class TensorFileError(ValueError):
    """The bytes are not a valid tensor file (truncated, altered, or not one at all)."""


def dumps(state: dict) -> bytes:
    """``state`` (tensors, numpy arrays and plain data, nested) as the bytes of a tensor file."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = json.dumps(_encode(state, "", tensors), allow_nan=True, separators=(",", ":"))
    index, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        shape, span = list(tensor.shape), [offset, offset + len(raw)]
        index[name] = {"dtype": CODES[tensor.dtype], "shape": shape, "data_offsets": span}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    metadata = {"format": FORMAT, "version": VERSION, "state": encoded, "sha256": _digest(index, encoded, data)}
    header = json.dumps({**index, "__metadata__": metadata}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(header)) + header + data


def loads(data: bytes) -> dict:
    """The state stored by ``dumps``; raises ``TensorFileError`` for anything else."""
    if len(data) < 8:
        raise TensorFileError(f"{len(data)} bytes: too short for a header (truncated?)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(MAX_HEADER, len(data) - 8):
        raise TensorFileError(f"header of {size} bytes in a file of {len(data)} (truncated, or not a tensor file)")
    try:
        header = json.loads(data[8 : 8 + size])
        metadata = header.pop("__metadata__")
        if metadata.get("format") != FORMAT:
            raise TensorFileError(f"not a distmeta tensor file (format {metadata.get('format')!r})")
        if metadata.get("version") != VERSION:
            raise TensorFileError(f"tensor file version {metadata.get('version')!r}; this distmeta reads {VERSION}")
        encoded, body = metadata["state"], data[8 + size :]
        if _digest(header, encoded, body) != metadata.get("sha256"):
            raise TensorFileError("it fails its checksum: it was altered or written partly")
        tensors = _tensors(header, body)
        return _decode(json.loads(encoded), tensors)
    except TensorFileError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, UnicodeDecodeError) as err:
        raise TensorFileError(f"malformed header ({type(err).__name__}: {err})") from None


def _digest(index: dict, encoded: str, data: bytes) -> str:
    digest = hashlib.sha256(json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
    digest.update(encoded.encode())
    digest.update(data)
    return digest.hexdigest()


def _encode(value, path: str, tensors: dict):
    if isinstance(value, torch.Tensor):
        return {"$tensor": _add(tensors, path, value)}
    if isinstance(value, np.ndarray):
        return {"$ndarray": _add(tensors, path, torch.from_numpy(np.array(value, order="C")))}  # a writable copy
    if isinstance(value, np.generic):  # numpy scalars: their Python value
        return _encode(value.item(), path, tensors)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {"$dict": [[_encode(k, path, tensors), _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} at {path or '/'} in a tensor file")


def _add(tensors: dict, path: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in CODES:
        raise TypeError(f"cannot store a {tensor.dtype} tensor at {path} in a tensor file")
    name = path.lstrip("/") or "value"
    while name in tensors:  # a path is unique unless a dict key holds a "/"
        name += "'"
    tensors[name] = tensor
    return name


def _tensors(index: dict, body: bytes) -> dict[str, torch.Tensor]:
    """The tensors of the index, after checking they tile the data exactly (as safetensors does)."""
    entries = sorted(index.items(), key=lambda item: item[1]["data_offsets"])
    offset, tensors = 0, {}
    for name, entry in entries:
        dtype = DTYPES.get(entry["dtype"])
        begin, end = (int(x) for x in entry["data_offsets"])
        shape = entry["shape"]
        if dtype is None:
            raise TensorFileError(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
        if not isinstance(shape, list) or not all(type(n) is int and 0 <= n < 2**63 for n in shape):
            raise TensorFileError(f"tensor {name!r} has the shape {shape!r:.80}: not a list of sizes")
        count = math.prod(shape)  # exact: numpy's int64 product would wrap a crafted header's sizes round to 0
        if begin != offset or end - begin != count * dtype.itemsize:
            raise TensorFileError(f"tensor {name!r}: offsets {begin}..{end} do not match its shape or its neighbours")
        raw = bytearray(body[begin:end])  # a copy the tensor owns
        if raw:
            tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
        elif max(shape, default=0) < 2**31:  # an empty tensor of any sizes: torch refuses a crafted [2**62, 2**62, 0]
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            raise TensorFileError(f"tensor {name!r} is empty, but has the sizes {shape}: not a tensor this file wrote")
        offset = end
    if offset != len(body):
        raise TensorFileError(f"the data holds {len(body)} bytes, the tensors {offset} (truncated or padded)")
    return tensors


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tags = [tag for tag in TAGS if tag in value]
    if not tags:
        if any(k.startswith("$") for k in value):
            raise TensorFileError(f"unknown tag in {sorted(value)}")
        return {k: _decode(v, tensors) for k, v in value.items()}
    if len(value) != 1:
        raise TensorFileError(f"a tagged value holds other keys: {sorted(value)}")
    tag, inner = tags[0], value[tags[0]]
    if tag in ("$tensor", "$ndarray"):
        if not isinstance(inner, str) or inner not in tensors:
            raise TensorFileError(f"{tag} {inner!r} is not in the file's tensor index")
        return tensors[inner] if tag == "$tensor" else tensors[inner].numpy()
    if tag == "$tuple":
        return tuple(_decode(v, tensors) for v in _list(inner, tag))
    decoded = {}
    for pair in _list(inner, tag):
        key, item = _list(pair, "$dict entry")
        decoded[_hashable(_decode(key, tensors))] = _decode(item, tensors)
    return decoded


def _list(value, what: str) -> list:
    if not isinstance(value, list) or (what == "$dict entry" and len(value) != 2):
        raise TensorFileError(f"malformed {what}: {value!r:.80}")
    return value


def _hashable(key):
    if (
        key is None
        or isinstance(key, (bool, int, float, str))
        or (isinstance(key, tuple) and all(isinstance(k, (bool, int, float, str)) for k in key))
    ):
        return key
    raise TensorFileError(f"a dict key must be a number or a string, not {type(key).__name__}")
