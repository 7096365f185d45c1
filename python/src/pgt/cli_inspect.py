"""``python -m pgt inspect FILE [--json]``: a look inside pgt's wire bytes, as ``pgt inspect``.

FILE is a metadata blob (a header message then the metadata message, as the golden ``valid_metadata``
and ``malformed`` vectors), a message stream as one receiver gets it (``tag u64 LE | len u64 LE |
bytes`` records, run through a real receiver) or a safetensors file (its header, read as
``python -m pgt send`` reads it). The report is aligned text, or with ``--json`` one JSON object with
``pgt inspect --json``'s fields (leaves in pgt-wasm's form, each with its ``path``). The module
(``pgt.abi``) decodes, validates and receives; malformed input still gets a report of what could be
read, then one error line on stderr and exit status 1. (``error.debug``, the Rust Debug form of the
error, is null here: the module gives the error's name and message.)
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import xxhash

from .abi import LIMITS, PREFIX_LEN, Pgt, PgtError, Reader, is_stale, leaf
from .cli_send import human
from .metadata import display
from .recv import load_module, receive
from .safetensors_io import SafetensorsError
from .safetensors_io import load as load_safetensors

TAG_HEADER, TAG_METADATA = 1, 2
MAGIC = b"PGT\0"
HEADER_SIZE = 32
FLAG_DIGESTS = 1


def parse_limit(s: str) -> tuple[str, int]:
    name, eq, value = s.partition("=")
    name = name.strip()
    if not eq:
        raise argparse.ArgumentTypeError(f"{s!r} is not NAME=N")
    if name not in LIMITS:
        raise argparse.ArgumentTypeError(f"unknown limit {name!r}")
    try:
        n = int(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 <= n < 1 << 64 or (name in ("max_depth", "max_ndim") and n >= 1 << 32):
        raise argparse.ArgumentTypeError(f"{name}={n} is too large")
    return name, n


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m pgt inspect",
        description="Decode and print a metadata blob, a message stream or a safetensors file's header.",
    )
    p.add_argument(
        "file", type=Path, help="a pgt metadata blob, a message stream or a safetensors file"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--format", choices=["auto", "metadata", "stream", "safetensors"], default="auto"
    )
    p.add_argument("--header-len", type=int, help="bytes of the header message in a metadata blob")
    p.add_argument("--rank", type=int, help="also check the metadata as this receiving rank would")
    p.add_argument("--source", type=int, help="with --rank: the sender the receiver expects")
    p.add_argument("--expect-step", type=int, help="with --rank or a stream: the step expected")
    p.add_argument(
        "--limit",
        dest="limits",
        action="append",
        default=[],
        type=parse_limit,
        metavar="NAME=N",
        help="override a decoding limit (max_metadata_bytes, max_leaves, max_depth, max_ndim, "
        "max_total_bytes, max_messages); repeatable",
    )
    p.add_argument("--wasm", type=Path, help="pgt_wasm.wasm (default: the module in the package)")
    return p.parse_args(argv)


class Report:
    def __init__(self, path: Path, fmt: str, file_bytes: int):
        self.json: dict = {"file": str(path), "format": fmt, "file_bytes": file_bytes}
        self.error: str | None = None

    def core_error(self, e: PgtError):
        if self.error is None:
            self.json["error"] = {"name": e.name, "debug": None, "message": e.message}
            self.error = f"{e.name}: {e.message}"

    def other_error(self, message: str):
        if self.error is None:
            self.json["error"] = {"name": None, "debug": None, "message": message}
            self.error = message


def u64_at(b, at: int) -> int | None:
    return struct.unpack_from("<Q", b, at)[0] if len(b) >= at + 8 else None


def detect(head: bytes, file_bytes: int, path: Path) -> str:
    if u64_at(head, 0) == TAG_HEADER and (u64_at(head, 8) or 0) <= file_bytes - 16:
        if u64_at(head, 8) is not None:
            return "stream"
    n = u64_at(head, 0)
    if head[8:9] == b"{" and n is not None and n <= file_bytes - 8:
        return "safetensors"
    if path.suffix == ".safetensors":
        return "safetensors"
    return "metadata"


# ---- metadata that may not validate ----


class StrictReader(Reader):
    """postcard as strictly as pgt-core's decoder reads it: bools and option tags 0 or 1, varints
    within u64 (``u32``: within u32; a ``Value::Int``'s: within 128 bits)."""

    def _varint(self, bits: int) -> int:
        out = shift = 0
        most = (bits + 6) // 7
        for _ in range(most):
            byte = self.b[self.i]
            self.i += 1
            out |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                if out >= 1 << bits:
                    raise ValueError(f"varint overflows u{bits}")
                return out
        raise ValueError(f"varint longer than {most} bytes")

    def varint(self) -> int:
        return self._varint(64)

    def varint128(self) -> int:
        return self._varint(128)

    def u32(self) -> int:
        v = self.varint()
        if v >= 1 << 32:
            raise ValueError("varint overflows u32")
        return v

    def bool(self) -> bool:
        b = self.byte()
        if b > 1:
            raise ValueError(f"bool byte {b}")
        return b == 1

    def opt(self, item):
        tag = self.byte()
        if tag > 1:
            raise ValueError(f"option tag {tag}")
        return item(self) if tag == 1 else None


def _node(r: Reader):
    tag = r.varint()
    if tag == 0:
        return {"dict": r.seq(_key)}
    if tag in (1, 2):
        return {["list", "tuple"][tag - 1]: r.uint()}
    if tag == 3:
        return "leaf"
    raise ValueError(f"node tag {tag}")


def _key(r: Reader):
    tag = r.varint()
    if tag > 1:
        raise ValueError(f"key tag {tag}")
    return r.str() if tag == 0 else {"int": r.zigzag()}


def decode_metadata(b: bytes) -> dict:
    """postcard ``Metadata`` decoded in Python, unvalidated (to show what an invalid one holds)."""
    r = StrictReader(b)
    out = {"step": r.opt(Reader.uint), "source": r.u32(), "destinations": r.seq(StrictReader.u32)}
    fanout = r.varint()
    if fanout > 1:
        raise ValueError(f"fanout tag {fanout}")
    out["plan"] = {
        "fanout": ["Direct", "Chain"][fanout],
        "bucket_size": r.uint(),
        "chunk_size": r.uint(),
    }
    out["tree"] = r.seq(_node)
    out["leaves"] = r.seq(leaf)
    r.done()
    return out


def display_paths(tree: list) -> list[str] | None:
    """Every leaf's key path, displayed, from a pre-order tree; None when the tree is malformed."""
    paths, path, stack = [], [], []
    it = iter(tree)
    n = next(it, None)
    if n is None:
        return None
    while True:
        if n == "leaf":
            paths.append(display(tuple(path)))
        else:
            if "dict" in n:
                typed = [k if isinstance(k, str) else ("int", int(k["int"])) for k in n["dict"]]
                if len(set(typed)) != len(typed):
                    return None  # DuplicateKey
                keys = [k if isinstance(k, str) else int(k["int"]) for k in n["dict"]]
                stack.append([len(keys), keys, 0])
            else:
                stack.append([int(n.get("list", n.get("tuple", 0))), None, 0])
            path.append("")
        while stack and stack[-1][0] == 0:
            stack.pop()
            path.pop()
        if not stack:
            break
        top = stack[-1]
        path[-1] = top[1][top[2]] if top[1] is not None else top[2]
        top[0] -= 1
        top[2] += 1
        n = next(it, None)
        if n is None:
            return None
    return paths if next(it, None) is None else None


def storages_of(leaf_: dict) -> list:
    k = leaf_["kind"]
    if k == "tensor":
        return [leaf_["layout"]]
    if k == "dtensor":
        return [leaf_["local"]]
    if k == "sharded_tensor":
        return [s["layout"] for s in leaf_["local_shards"]]
    return []


def raw_header_json(h: bytes) -> dict:
    def u16(i):
        return struct.unpack_from("<H", h, i)[0] if len(h) >= i + 2 else None

    flags = u16(6)
    hexu = [None if (v := u64_at(h, i)) is None else f"0x{v:016x}" for i in (16, 24)]
    magic = None
    if len(h) >= 4:  # as Rust's escape_ascii
        special = {9: "\\t", 10: "\\n", 13: "\\r", 34: '\\"', 39: "\\'", 92: "\\\\"}
        magic = "".join(special.get(c, chr(c) if 32 <= c < 127 else f"\\x{c:02x}") for c in h[:4])
    return {
        "len": len(h),
        "magic": magic,
        "magic_ok": h[:4] == MAGIC,
        "version": u16(4),
        "flags": flags,
        "digests": None if flags is None else bool(flags & FLAG_DIGESTS),
        "metadata_len": u64_at(h, 8),
        "metadata_digest": hexu[0],
        "transfer_id": hexu[1],
    }


def metadata_json(report: Report, md: dict, paths: list | None, validated: bool):
    j = report.json
    j["step"] = None if md["step"] is None else int(md["step"])
    j["source"] = md["source"]
    j["destinations"] = md["destinations"]
    plan = md["plan"]
    j["plan"] = {
        "fanout": plan["fanout"].lower(),
        "bucket_size": int(plan["bucket_size"]),
        "chunk_size": int(plan["chunk_size"]),
    }
    j["validated"] = validated
    j["leaf_count"] = len(md["leaves"])
    layouts = [lay for lf in md["leaves"] for lay in storages_of(lf)]
    j["storage_count"] = len(layouts)
    total = sum(int(lay["nbytes"]) for lay in layouts)
    j["total_bytes"] = total if total < 1 << 64 else None
    paths = paths or []
    j["leaves"] = [
        {**lf, "path": paths[i] if i < len(paths) else f"#{i}"} for i, lf in enumerate(md["leaves"])
    ]


def limits_of(pgt: Pgt, args) -> dict:
    limits = pgt.default_limits()
    for name, n in args.limits:
        limits[name] = n
    return limits


def show_metadata(report: Report, pgt: Pgt, h: bytes, m: bytes, limits: dict) -> dict | None:
    """Decodes and validates header ``h`` + metadata message ``m`` with the module into the report
    (as far as it decodes when it does not validate); the module's summary, or None."""
    summary = None
    try:
        summary = pgt.decode(h, m, limits)
    except PgtError as e:
        report.core_error(e)
    if summary is not None:
        md = {k: summary[k] for k in ("step", "source", "destinations", "plan", "leaves")}
        metadata_json(report, md, summary["paths"], True)
        return summary
    try:
        md = decode_metadata(bytes(m[PREFIX_LEN:]))
    except (IndexError, ValueError, AssertionError, UnicodeDecodeError):
        return None
    metadata_json(report, md, display_paths(md["tree"]), False)
    return None


def receiver_json(report: Report, args, rank: int, source: int | None) -> dict:
    rx = {
        "rank": rank,
        "source": args.source if args.source is not None else (source or 0),
        "expected_step": args.expect_step,
    }
    report.json["receiver"] = rx
    return rx


def inspect_blob(path: Path, b: bytes, args, pgt: Pgt) -> Report:
    report = Report(path, "metadata", len(b))
    default = 24 if b[4:6] == b"\x01\x00" else HEADER_SIZE
    n = min(args.header_len if args.header_len is not None else default, len(b))
    h, m = b[:n], b[n:]
    report.json["header"] = raw_header_json(h)
    report.json["metadata_bytes"] = len(m)
    limits = limits_of(pgt, args)
    summary = show_metadata(report, pgt, h, m, limits)
    if summary is not None:
        report.json["messages"] = len(pgt.plan(h, m, limits))
        if args.rank is not None:
            rx = receiver_json(report, args, args.rank, summary["source"])
            r = pgt.receiver(args.rank, rx["source"], args.expect_step, limits)
            try:
                r.handle_header(h)
                r.handle_metadata(m)
            except PgtError as e:
                report.core_error(e)
            finally:
                r.drop()
    return report


def parse_records(b: bytes):
    out, at = [], 0
    while at < len(b):
        tag, n = u64_at(b, at), u64_at(b, at + 8)
        if n is None:
            return (
                out,
                f"record {len(out)} is cut short: {len(b) - at} bytes left, a record header takes 16",
            )
        if len(b) - at - 16 < n:
            return (
                out,
                f"record {len(out)} (tag {tag}) announces {n} bytes, {len(b) - at - 16} follow",
            )
        out.append((tag, b[at + 16 : at + 16 + n]))
        at += 16 + n
    return out, None


class StreamHost:
    """``receive``'s host over a stream's records, in order: data into fresh storages (hashed when
    asked), stale records skipped, forwarded messages dropped."""

    class Malformed(Exception):
        pass

    def __init__(self, records):
        self.it = iter(enumerate(records))
        self.storages: list = []
        self.hashers: dict = {}
        self.events: list = []
        self.paths: list = []
        self.incoming = None

    def recv_bytes(self, op):
        got = next(self.it, None)
        if got is None:
            raise self.Malformed(
                f"the stream ends where the receiver expects message tag {op['tag']} ({op['kind']})"
            )
        i, (tag, data) = got
        if tag != int(op["tag"]):
            raise self.Malformed(
                f"record {i} has tag {tag}, the receiver expects tag {op['tag']} ({op['kind']})"
            )
        if op["kind"] != "trailer" and not is_stale(op, data) and len(data) != int(op["len"]):
            raise self.Malformed(
                f"record {i} (tag {tag}) is {len(data)} bytes, the receiver expects {op['len']}"
            )
        if is_stale(op, data):
            return self.recv_bytes(op)
        return data

    def discard(self, op):
        return False

    def bind(self, incoming, paths):
        self.incoming = incoming
        self.paths = paths()
        return []

    def bound(self, incoming, bindings):
        self.storages = [bytearray(int(b["nbytes"])) for b in bindings]

    def recv_data(self, op, segments):
        data, at, digests = self.recv_bytes(op), PREFIX_LEN, []
        for seg in segments:
            s, off, n = seg["storage"], int(seg["offset"]), int(seg["len"])
            self.storages[s][off : off + n] = data[at : at + n]
            if op["hash"]:
                h = self.hashers.setdefault(s, xxhash.xxh3_64())
                h.update(data[at : at + n])
                if seg["completes"]:
                    digests.append(self.hashers.pop(s).intdigest())
            at += n
        self.events.append(("landed", op["message"]))
        if op["hash"]:
            self.events.append(("digests", op["message"], digests))

    def forward(self, op, payload):
        self.events.append(("forwarded", op["message"]))

    def next_event(self, wait):
        return self.events.pop(0) if self.events else None


def _display(path: list) -> str:
    """A decoded key path (``{"key"|"int_key"|"index": …}`` elements) as pgt displays it."""
    return display(
        tuple(e["key"] if "key" in e else int(e.get("int_key", e.get("index"))) for e in path)
    )


def inspect_stream(path: Path, b: bytes, args, pgt: Pgt) -> Report:
    report = Report(path, "stream", len(b))
    records, cut = parse_records(b)
    kinds = {TAG_HEADER: "header", TAG_METADATA: "metadata"}
    header = records[0][1] if records and records[0][0] == TAG_HEADER else None
    tid = u64_at(header, 24) if header is not None else None

    def stale(i: int, data: bytes) -> bool:
        return i > 0 and tid is not None and len(data) >= 8 and u64_at(data, 0) != tid

    report.json["records"] = [
        {"tag": t, "len": len(d), "kind": kinds.get(t, "data/trailer"), "stale": stale(i, d)}
        for i, (t, d) in enumerate(records)
    ]
    if cut is not None:
        report.other_error(f"malformed stream: {cut}")
    meta = next(
        (d for i, (t, d) in enumerate(records) if i > 0 and t == TAG_METADATA and not stale(i, d)),
        None,
    )
    source = None
    if header is not None:
        report.json["header"] = raw_header_json(header)
    limits = limits_of(pgt, args)
    if meta is not None:
        report.json["metadata_bytes"] = len(meta)
        saved = report.error, report.json.get("error")
        show_metadata(report, pgt, header or b"", meta, limits)
        # The receiver names what is wrong below, from the header on.
        report.error = saved[0]
        if saved[1] is None:
            report.json.pop("error", None)
        source = report.json.get("source")
        dests = report.json.get("destinations") or []
    else:
        dests = []
    rank = args.rank if args.rank is not None else (dests[0] if dests else 1)
    rx = receiver_json(report, args, rank, source)
    host = StreamHost(records)
    try:
        receive(pgt.receiver(rank, rx["source"], args.expect_step, limits), host)
        left = next(host.it, None)
        if left is not None:
            raise StreamHost.Malformed(
                f"record {left[0]} (tag {left[1][0]}) and later ones are left over after the transfer completed"
            )
    except PgtError as e:
        report.json["received"] = False
        report.core_error(e)
    except StreamHost.Malformed as e:
        report.json["received"] = False
        report.other_error(f"malformed stream: {e}")
    else:
        report.json["received"] = True
        report.json["received_storages"] = [
            {
                "path": _display(host.paths[int(ref["leaf"])]) if host.paths else "",
                "shard": ref["shard"],
                "nbytes": ref["nbytes"],
                "digest": f"0x{xxhash.xxh3_64_intdigest(bytes(buf)):016x}",
            }
            for ref, buf in zip(host.incoming["storages"], host.storages, strict=True)
        ]
    return report


def inspect_safetensors(path: Path, file_bytes: int) -> Report:
    report = Report(path, "safetensors", file_bytes)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) == 8:
            report.json["header_len"] = u64_at(head, 0)
        f = load_safetensors(path)
    except (SafetensorsError, OSError) as e:
        report.other_error(str(e))
        return report
    report.json["step"] = f.step
    paths = display_paths(f.tree) or []
    ranges = iter(t[3] for t in f.tensors)
    leaves = []
    for p, lf in zip(paths, f.leaves, strict=True):
        entry = {**lf, "path": p}
        if lf["kind"] == "tensor":
            entry["file_range"] = list(next(ranges))
        leaves.append(entry)
    report.json["tensor_count"] = len(f.tensors)
    report.json["leaf_count"] = len(leaves)
    report.json["total_bytes"] = sum(len(s) for s in f.storages)
    report.json["leaves"] = leaves
    return report


# ---- text ----


def _opt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _list(v) -> str:
    return "[" + ", ".join(str(x) for x in v) + "]" if isinstance(v, list) else "-"


def _value_text(v: dict) -> str:
    t = v["type"]
    if t == "none":
        return "None"
    if t == "bool":
        return "True" if v["value"] else "False"
    if t == "int":
        return str(v["value"])
    if t == "float":
        f = struct.unpack("<d", int(v["bits"], 16).to_bytes(8, "little"))[0]
        return f"nan (bits {v['bits']})" if f != f else repr(f)
    if t == "str":
        return json.dumps(v["value"], ensure_ascii=False)
    return "bytes 0x" + v["hex"]


COLUMNS = ["PATH", "KIND", "DTYPE", "SHAPE", "STRIDE", "OFFSET", "NBYTES", "DETAILS"]
KIND_TEXT = {
    "value": "value",
    "tensor": "tensor",
    "dtensor": "dtensor",
    "sharded_tensor": "sharded",
}


def leaf_row(e: dict) -> list[str]:
    k = e["kind"]
    if k == "value":
        v = e["value"]
        return [e["path"], "value", v["type"], "-", "-", "-", "-", _value_text(v)]
    if k in ("tensor", "dtensor"):
        lay = e["layout"] if k == "tensor" else e["local"]
        details = ""
        if k == "dtensor":
            sp = e["spec"]
            names = sp["mesh"].get("dim_names")
            names = f" ({', '.join(names)})" if names else ""
            details = (
                f"global {_list(sp['global_shape'])} {sp['dtype']} on {sp['mesh']['device_type']} "
                f"mesh {_list(sp['mesh']['shape'])}{names}: {', '.join(sp['placements'])}"
            )
        elif "file_range" in e:
            details = f"file bytes {e['file_range'][0]}..{e['file_range'][1]}"
        return [
            e["path"],
            KIND_TEXT[k],
            lay["dtype"],
            _list(lay["shape"]),
            _list(lay["stride"]),
            str(lay["storage_offset"]),
            str(lay["nbytes"]),
            details,
        ]
    g = e["global"]
    locs = [
        f"{_list(s['meta']['offsets'])}+{_list(s['meta']['sizes'])}@{s['meta']['placement']}"
        for s in e["local_shards"]
    ]
    return [
        e["path"],
        "sharded",
        g["dtype"],
        _list(g["global_size"]),
        "-",
        "-",
        str(sum(int(s["layout"]["nbytes"]) for s in e["local_shards"])),
        f"{len(e['local_shards'])} local of {len(g['shards'])} shards: {', '.join(locs)}",
    ]


def render(r: dict) -> str:
    fields: list[tuple[str, str]] = [("file", f"{r['file']} ({r['file_bytes']} bytes)")]
    fmt = r["format"]
    fields.append(
        (
            "format",
            {
                "metadata": "pgt header + metadata message",
                "stream": "pgt message stream (tag | len | bytes records)",
            }.get(fmt, fmt),
        )
    )
    if "records" in r:
        recs = r["records"]
        data = sum(1 for x in recs if x["tag"] > TAG_METADATA)
        lens = " ".join(f"{x['tag']}:{x['len']}{'*' if x['stale'] else ''}" for x in recs)
        fields.append(("records", f"{len(recs)} ({data} after the metadata) tag:len {lens}"))
    if "header" in r:
        h = r["header"]
        flags = "-"
        if h["flags"] is not None:
            flags = f"0x{h['flags']:04x}" + (" (digests)" if h["flags"] & FLAG_DIGESTS else "")
        fields.append(
            (
                "header",
                f'{h["len"]} bytes: magic "{_opt(h["magic"])}"{"" if h["magic_ok"] else " (bad)"}, '
                f"version {_opt(h['version'])}, flags {flags}, metadata_len {_opt(h['metadata_len'])}, "
                f"metadata_digest {_opt(h['metadata_digest'])}, transfer_id {_opt(h['transfer_id'])}",
            )
        )
    if r.get("header_len") is not None:
        n = r["header_len"]
        fields.append(("header", f"{n} bytes of JSON; tensor data from byte {n + 8}"))
    if "metadata_bytes" in r:
        fields.append(("metadata", f"{r['metadata_bytes']} bytes"))
    if "step" in r:
        fields.append(("step", "none" if r["step"] is None else str(r["step"])))
    if "source" in r:
        fields.append(("source", _opt(r["source"])))
    if "destinations" in r:
        fields.append(("destinations", _list(r["destinations"])))
    if "plan" in r:
        p = r["plan"]
        fields.append(
            (
                "plan",
                f"fanout {p['fanout']}, bucket_size {p['bucket_size']} ({human(p['bucket_size'])}), "
                f"chunk_size {p['chunk_size']} ({human(p['chunk_size'])})",
            )
        )
    if "messages" in r:
        fields.append(("messages", str(r["messages"])))
    if "leaf_count" in r:
        storages = r.get("storage_count", r.get("tensor_count"))
        fields.append(("leaves", f"{r['leaf_count']} ({_opt(storages)} storages)"))
    if "total_bytes" in r:
        t = r["total_bytes"]
        fields.append(("total bytes", "-" if t is None else f"{t} ({human(t)})"))
    if r.get("validated") is False:
        fields.append(("validated", "no: the metadata decodes but does not validate"))
    if "receiver" in r:
        rx = r["receiver"]
        rec = ""
        if r.get("received") is True:
            rec = f": received completely, {len(r.get('received_storages', []))} storages verified"
        elif r.get("received") is False:
            rec = ": failed"
        fields.append(
            (
                "receiver",
                f"rank {rx['rank']}, source {rx['source']}, expected step {_opt(rx['expected_step'])}{rec}",
            )
        )
    if "error" in r:
        e = r["error"]
        fields.append(("error", f"{e['name']}: {e['message']}" if e["name"] else e["message"]))
    else:
        fields.append(("valid", "yes" if r.get("valid") else "no"))
    width = max(len(k) for k, _ in fields)
    out = "".join(f"{k:<{width}}  {v}\n" for k, v in fields)
    leaves = r.get("leaves") or []
    if not leaves:
        return out
    rows = [COLUMNS] + [leaf_row(e) for e in leaves]
    widths = [max(len(row[i]) for row in rows) for i in range(8)]
    out += "\n"
    for row in rows:
        cells = []
        for i, (c, w) in enumerate(zip(row, widths, strict=True)):
            if i == 7:
                cells.append(c)
            elif i in (5, 6):
                cells.append(f"{c:>{w}}  ")
            else:
                cells.append(f"{c:<{w}}  ")
        out += "".join(cells).rstrip() + "\n"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    path = args.file
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            file_bytes = f.seek(0, 2)
    except OSError as e:
        print(f"pgt inspect: error: cannot open {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    fmt = detect(head, file_bytes, path) if args.format == "auto" else args.format
    if fmt == "safetensors":
        report = inspect_safetensors(path, file_bytes)
    else:
        try:
            pgt = load_module(args.wasm)
        except (FileNotFoundError, RuntimeError) as e:
            print(f"pgt inspect: error: {e}", file=sys.stderr)
            return 2
        b = path.read_bytes()
        report = (inspect_stream if fmt == "stream" else inspect_blob)(path, b, args, pgt)
    report.json["valid"] = report.error is None
    text = json.dumps(report.json, indent=2) + "\n" if args.json else render(report.json)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    if report.error is not None:
        msg = report.error if str(path) in report.error else f"{path}: {report.error}"
        print(f"pgt inspect: error: {msg}", file=sys.stderr)
        return 1
    return 0
