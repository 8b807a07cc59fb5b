"""Checkpoint files: plain dicts of tensors and builtins, written atomically, loaded with
weights_only, with errors that name the file. What a checkpoint holds is `compress.spec`'s
business; this module only reads and writes.

Two kinds of file are read: this project's checkpoints (a format tag, the architecture, the
weights) and a plain `state_dict` saved by someone else's training script
(`torch.save(model.state_dict(), f)`, or a dict holding one under a usual key). The second
carries no architecture: the caller builds the model from its config and loads the weights.

A file says what it is. A checkpoint carries its format tag, a `version` and a `checksum`
(SHA-256 over every tensor's dtype, shape and bytes and all the plain data, in a fixed key
order): torch's zip reader does not verify its CRCs, so without it a flipped bit in the tensor
data loads as a different model. Every reader identifies a file before it trusts it: a text
file, a directory, an ONNX model, a pickled module, a damaged checkpoint, ... is refused in
one line that says what the file is and what was expected. Pickled code is refused unread
where the bytes show it (a raw pickle), and otherwise by torch's weights_only unpickler.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from compress.errors import CheckpointError

FORMAT = "compress/1"
# 1: no checksum (written before checkpoints carried one; still read); 2: `checksum`
VERSION = 2
# keys under which training scripts commonly nest their state_dict
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# prefixes a wrapper adds to every key: DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

CHECKPOINT = "expected a compress checkpoint (a .pt file written by train.py, prune.py or fuse.py)"
WEIGHTS = "expected a compress checkpoint or a torch.save(model.state_dict(), f) file"
ZIP = b"PK\x03\x04"  # torch.save's format since torch 1.6 is a zip archive
# the first bytes of formats someone may pass by mistake
MAGIC = (
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x7fELF", "an executable"),
    (b"%PDF", "a PDF document"),
)
HEAD = 4096  # bytes read to identify a file
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- checksum
def _feed(h: Any, obj: Any) -> None:
    """Add `obj` to hash `h`: a tagged, length-prefixed serialization that depends only on the
    values (dict keys sorted), so a loaded checkpoint hashes as the state that was saved."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        if t.numel():  # raw bytes, whatever the dtype (bf16 and float8 included)
            h.update(t.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        h.update(f"D{len(items)}:".encode())
        for k, v in items:
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, set | frozenset):
        _feed(h, sorted(obj, key=repr))
    elif isinstance(obj, str):
        b = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(b)}:".encode() + b)
    elif isinstance(obj, bytes | bytearray):
        h.update(f"B{len(obj)}:".encode() + bytes(obj))
    elif obj is None or isinstance(obj, bool):
        h.update(f"{obj!r};".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()};".encode())
    else:  # torch.dtype, torch.device, complex, ...: their repr is their value
        h.update(f"O{type(obj).__qualname__}:{obj!r};".encode())


def checksum(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's tensors and plain data, its own `checksum` left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "checksum"})
    return h.hexdigest()


def save_checkpoint(
    path: str | Path, state: dict[str, Any], fmt: str = FORMAT, version: int = VERSION
) -> Path:
    """Write `state` to `path` atomically: a crash leaves either the old file or the new one.
    The file gets the format tag, the version and the checksum (any stale ones in `state`, as
    when a loaded checkpoint is saved again, are replaced). `fmt` and `version`: another
    format's (pack.py's packed files are written the same way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    rest = {k: v for k, v in state.items() if k not in ("format", "version", "checksum")}
    full = {"format": fmt, "version": version, **rest}
    full["checksum"] = checksum(full)
    torch.save(full, tmp)
    os.replace(tmp, path)
    return path


def verify(
    path: Path, state: dict[str, Any], latest: int = VERSION, what: str = "checkpoint"
) -> None:
    """Refuse a loaded file whose contents are not what was written (or from a newer writer):
    its `version` (1 when absent: written before files carried a checksum, not verified) is at
    most `latest`, and from version 2 on its `checksum` matches. `what` names the kind of file
    in the messages (pack.py's packed files are verified the same way)."""
    version = state.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path} is damaged: its version {version!r} is not a version")
    if version > latest:
        raise CheckpointError(
            f"{path} is a version {version} {what}, written by a newer version of this "
            f"project (this one reads versions up to {latest}): update compress to read it"
        )
    stored = state.get("checksum")
    if stored is None and version == 1:
        log.debug("%s was written before %ss carried a checksum: not verified", path, what)
        return
    if stored is None:
        raise CheckpointError(
            f"{path} is damaged: a version {version} {what} carries a checksum, this one none"
        )
    if stored != checksum(state):
        raise CheckpointError(
            f"{path} is damaged: its tensors or data do not match the checksum written with it "
            "(use another copy, or write it again)"
        )


# ---------------------------------------------------------------- identifying a file
def _text(head: bytes, whole: bool) -> str | None:
    """`head` as text, if it is UTF-8 without control characters (a multi-byte character cut
    at the end of a partial read is allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if whole or e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    ok = all(c.isprintable() or c in "\t\n\r\f\v" for c in text)
    return text if ok and text.strip() else None


def describe(path: Path, head: bytes, whole: bool) -> str:
    """What a file that is not a torch.save file is, from its first bytes and its name:
    'a CSV file (it begins ...)', 'an ONNX model', ..."""
    suffix = path.suffix.lower()
    for magic, what in MAGIC:
        if head.startswith(magic):
            return what
    if len(head) > 10 and head[8:10] == b'{"' and suffix == ".safetensors":
        return "a safetensors file"
    if head[257:262] == b"ustar":
        return "a tar archive"
    # an ONNX ModelProto starts with field 1 (ir_version, a varint: byte 0x08)
    if suffix == ".onnx" or (head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head)):
        return "an ONNX model"
    text = _text(head, whole)
    if text is not None:
        lines = text.strip().splitlines()
        first = lines[0].strip()
        commas = first.count(",")
        if suffix == ".csv" or (commas and len(lines) > 1 and lines[1].count(",") == commas):
            kind = "a CSV file"
        elif suffix == ".json" or first.startswith(("{", "[")):
            kind = "a JSON file"
        elif suffix in (".yaml", ".yml"):
            kind = "a YAML file"
        else:
            kind = "a text file"
        shown = first if len(first) <= 40 else first[:37] + "..."
        return f"{kind} (it begins {shown!r})"
    return f"binary data of no format this project reads (it begins {head[:8].hex(' ')})"


def _zip_kind(path: Path) -> str | None:
    """What a zip archive is when it is not a torch.save file (None: it looks like one, or is
    too damaged to tell, which torch.load then reports)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "a TorchScript archive (torch.jit.save), not a checkpoint"
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return None
    if path.suffix.lower() == ".npz" or (names and all(n.endswith(".npy") for n in names)):
        return "a NumPy .npz archive, not a torch.save file"
    return "a zip archive but not a torch.save file (it holds no data.pkl)"


_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _refusal(
    path: Path, e: Exception, pickle_only: bool, what: str, expected: str
) -> CheckpointError:
    """The one line for a file that torch.load(weights_only=True) refused. torch's message
    advises weights_only=False, the unsafe load this project refuses: it is not quoted."""
    msg = str(e)
    found = _GLOBAL.search(msg)
    if found:
        name = found.group(1)
        return CheckpointError(
            f"{path} holds pickled Python objects ({name}), not only tensors and plain data: "
            "refused as unsafe, since unpickling them can run arbitrary code; save "
            "model.state_dict() with torch.save instead"
        )
    if pickle_only and "magic number" in msg:
        return CheckpointError(f"{path} is a Python pickle, not a torch.save file: {expected}")
    reason = msg.partition("WeightsUnpickler error:")[2] if "WeightsUnpickler" in msg else msg
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    reason = reason if len(reason) <= 120 else reason[:117] + "..."
    return CheckpointError(f"{what} {path} is corrupt or truncated ({reason})")


def read_torch_file(
    path: Path, map_location: str | torch.device, expected: str, what: str = "checkpoint"
) -> Any:
    """The object in a torch.save file (weights_only), after its bytes say it is one: anything
    else is refused in one line naming the file, what it is and `expected`. `what` names the
    kind of file wanted ("checkpoint", "packed checkpoint")."""
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a {what} file: {expected}")
    try:
        with path.open("rb") as f:
            head = f.read(HEAD)
            whole = len(head) < HEAD or not f.read(1)
    except OSError as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not head:
        raise CheckpointError(f"{path} is an empty file, not a {what}: {expected}")
    if head.startswith(ZIP):
        kind = _zip_kind(path)
        if kind is not None:
            raise CheckpointError(f"{path} is {kind}: {expected}")
    elif head[:1] == b"\x80" and len(head) > 1 and head[1] > 2:
        # torch.save's legacy (pre-zip) format is pickle protocol 2; a newer protocol is a
        # pickle.dump, which may hold code: not unpickled at all
        raise CheckpointError(
            f"{path} is a Python pickle (pickle.dump, protocol {head[1]}), not a torch.save "
            f"file: refused unread, since unpickling can run arbitrary code; {expected}"
        )
    elif head[:1] != b"\x80":
        raise CheckpointError(f"{path} is {describe(path, head, whole)}, not a {what}: {expected}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # any failure to read an archive or pickle is a damaged file
        pickle_only = not head.startswith(ZIP)
        raise _refusal(path, e, pickle_only, what, expected) from None


# ---------------------------------------------------------------- readers
def is_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is one of this project's checkpoints."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "arch" in obj


def _other_format(path: Path, obj: Any) -> CheckpointError | None:
    """The error for a file of another format tag (a packed checkpoint, ...), if it is one."""
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if not isinstance(fmt, str) or fmt == FORMAT:
        return None
    hint = ""
    if fmt.startswith("compress-packed"):
        hint = " (pack.py's packed file: pass the checkpoint pack.py read)"
    return CheckpointError(f"{path} is a '{fmt}' file, not a '{FORMAT}' checkpoint{hint}")


def describe_object(obj: Any) -> str:
    """A loaded object in a few words: 'a dict with keys epoch, lr', 'a list'."""
    what = type(obj).__name__
    keys = ", ".join(map(str, list(obj)[:5])) if isinstance(obj, dict) else ""
    return f"a {what}" + (f" with keys {keys}" if keys else "")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, verified against its checksum."""
    path = Path(path)
    state = read_torch_file(path, map_location, CHECKPOINT)
    if isinstance(state, dict) and state.get("format") == FORMAT:
        verify(path, state)
    if is_checkpoint(state):
        return state
    other = _other_format(path, state)
    if other is not None:
        raise other
    sd = as_state_dict(state)
    if sd is not None:
        first = next(iter(sd))
        raise CheckpointError(
            f"{path} is a plain state_dict ({len(sd)} tensors, the first {first!r}), not a "
            "compress checkpoint: it does not record its architecture; pass it as "
            "init_from= or ckpt= with model=NAME"
        )
    raise CheckpointError(
        f"{path} is not a compress checkpoint ({describe_object(state)}; no '{FORMAT}' format tag)"
    )


def _tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrapped(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the prefix a DDP or torch.compile wrapper put on every one of them."""
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The plain state_dict in a loaded object: the object itself, or one nested under a usual
    key (`state_dict`, `model`, `model_state_dict`, ...); None when there is none."""
    if _tensor_dict(obj):
        return _unwrapped(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _tensor_dict(obj.get(key)):
                return _unwrapped(obj[key])
    return None


def load_weights_file(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[str, dict[str, Any]]:
    """Read a checkpoint or a plain state_dict file: ("checkpoint", state) or ("state_dict",
    {parameter name: tensor}). Anything else is refused with one line naming the file."""
    path = Path(path)
    obj = read_torch_file(path, map_location, WEIGHTS)
    # anything that claims to be ours is verified, so a damaged format tag cannot pass the
    # weights off as a plain state_dict
    if isinstance(obj, dict) and (
        obj.get("format") == FORMAT or isinstance(obj.get("checksum"), str)
    ):
        verify(path, obj)
    if is_checkpoint(obj):
        return "checkpoint", obj
    other = _other_format(path, obj)
    if other is not None:
        raise other
    sd = as_state_dict(obj)
    if sd is None:
        raise CheckpointError(
            f"{path} is neither a compress checkpoint nor a state_dict ({describe_object(obj)}"
            "; expected torch.save(model.state_dict(), f) or a dict holding one under "
            + ", ".join(STATE_DICT_KEYS[:3])
            + ")"
        )
    return "state_dict", sd
