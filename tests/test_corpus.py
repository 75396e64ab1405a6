"""The bad-input corpus (tests/corpus/*.http), replayed byte for byte.

Each case runs against zotlb in front of a backend that records every request
it receives, with a listening "other host" that must never be contacted.
See tests/corpus/README.md for the file format.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import conftest
import pytest
from conftest import lb_config, needs_registry, start_zotlb, wait_until
from recorder import Recorder, Tripwire

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(p.stem for p in CORPUS.glob("*.http"))
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rn0t\\])")
_FILL = re.compile(r"\{FILL:(.):(\d+)\}")
_SIMPLE = {"r": "\r", "n": "\n", "0": "\0", "t": "\t", "\\": "\\"}


@dataclass
class Case:
    name: str
    description: str
    meta: dict[str, str]
    template: list[str] = field(default_factory=list)

    def request(self, other: str) -> bytes:
        out = []
        for line in self.template:
            joined = line.endswith("\\") and not line.endswith("\\\\")
            text = line[:-1] if joined else line
            text = text.replace("{OTHER}", other)
            text = _FILL.sub(lambda m: m[1] * int(m[2]), text)
            text = _ESCAPE.sub(
                lambda m: chr(int(m[1][1:], 16)) if m[1][0] == "x" else _SIMPLE[m[1]],
                text,
            )
            out.append(text if joined else text + "\r\n")
        return "".join(out).encode("latin-1")

    def expected(self, key: str, non_v2: str) -> str:
        if non_v2 == "pass" and f"{key}-pass" in self.meta:
            return self.meta[f"{key}-pass"]
        return self.meta[key]


def load_case(name: str) -> Case:
    lines = (CORPUS / f"{name}.http").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{name}: must end with a newline"
    lines.pop()
    description, meta = "", {}
    while lines and lines[0].startswith("#"):
        text = lines.pop(0)[1:].strip()
        key, sep, value = text.partition(":")
        if sep and re.fullmatch(r"[a-z-]+", key):
            meta[key] = value.strip()
        elif not description:
            description = text
    assert description and "expect" in meta and "backend" in meta, name
    return Case(name, description, meta, lines)


def test_every_case_parses() -> None:
    assert len(CASES) >= 30
    for name in CASES:
        case = load_case(name)
        assert case.request("127.0.0.1:1").endswith((b"\r\n", b"abcd")), name


# --- a raw HTTP/1.1 client that counts responses ----------------------------------


@dataclass
class Reply:
    statuses: list[int]
    closed: bool
    raw: bytes


def _parse_responses(data: bytes, head_only: bool = False) -> tuple[list[int], bytes]:
    """The statuses of the complete responses in data, and what is left over."""
    statuses = []
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise AssertionError(f"not an HTTP response: {data[:200]!r}")
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (x.partition(":") for x in lines[1:])
        }
        if not head_only and "chunked" in headers.get("transfer-encoding", ""):
            end = _chunked_end(rest)
            if end is None:
                break
            statuses.append(int(parts[1]))
            data = rest[end:]
            continue
        length = 0 if head_only else int(headers.get("content-length", "0"))
        if len(rest) < length:
            break
        statuses.append(int(parts[1]))
        data = rest[length:]
    return statuses, data


def _chunked_end(body: bytes) -> int | None:
    """Where a complete chunked body ends (trailers not expected), or None."""
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(body[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2 + size + 2
        if len(body) < pos:
            return None
        if size == 0:
            return pos


def exchange(port: int, data: bytes, want: int, linger: float = 0.1) -> Reply:
    """Send data; read until `want` responses are complete (then `linger`
    more seconds for anything extra) or the connection closes."""
    raw = bytearray()
    closed = False
    head_only = data.startswith(b"HEAD ")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            closed = True
        while not closed:
            statuses, _ = _parse_responses(bytes(raw), head_only)
            sock.settimeout(linger if len(statuses) >= want else 5)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
            raw.extend(chunk)
    statuses, rest = _parse_responses(bytes(raw), head_only)
    assert not rest.strip(), f"a partial or extra response: {rest[:200]!r}"
    return Reply(statuses, closed, bytes(raw))


def _matches(status: int | None, expectation: str) -> bool:
    for option in expectation.split("|"):
        if option == "closed" and status is None:
            return True
        if status is not None and option.endswith("xx") and str(status)[0] == option[0]:
            return True
        if status is not None and option == str(status):
            return True
    return False


def _count_ok(count: int, expectation: str) -> bool:
    low, _, high = expectation.partition("-")
    return int(low) <= count <= int(high or low)


# --- the corpus against a running zotlb -------------------------------------------


@pytest.fixture(scope="module")
def other_host():
    wire = Tripwire().start()
    yield wire
    wire.close()


@pytest.fixture(scope="module")
def recorder():
    rec = Recorder().start()
    yield rec
    rec.close()


def _start_lb(recorder, tmp_path_factory, non_v2: str):
    cfg = lb_config(
        [recorder],
        health={"path": recorder.probe_path, "expect_status": [200]},
        non_v2=non_v2,
        replication={"mode": "off"},
    )
    lb = start_zotlb(tmp_path_factory.mktemp(f"corpus-{non_v2}"), cfg)
    lb.non_v2 = non_v2
    return lb


@pytest.fixture(scope="module")
def corpus_lb(recorder, tmp_path_factory):
    lb = _start_lb(recorder, tmp_path_factory, "reject")
    yield lb
    lb.stop()


@pytest.fixture(scope="module")
def pass_lb(recorder, tmp_path_factory):
    lb = _start_lb(recorder, tmp_path_factory, "pass")
    yield lb
    lb.stop()


PASS_CASES = [n for n in CASES if any(k.endswith("-pass") for k in load_case(n).meta)]
ALIVE = b"GET /v2/ HTTP/1.1\r\nHost: zotlb\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("name", CASES)
def test_corpus_case(name, corpus_lb, recorder, other_host) -> None:
    replay(name, corpus_lb, recorder, other_host)


@pytest.mark.parametrize("name", PASS_CASES)
def test_corpus_case_non_v2_pass(name, pass_lb, recorder, other_host) -> None:
    replay(name, pass_lb, recorder, other_host)


def replay(name, corpus_lb, recorder, other_host) -> None:
    case = load_case(name)
    mode = corpus_lb.non_v2
    expect = case.expected("expect", mode)
    want = int(case.meta.get("responses", "1"))
    recorder.clear()

    reply = exchange(corpus_lb.port, case.request(other_host.hostport), want)
    seen = recorder.requests()
    print(
        f"{name} [non_v2={mode}]: statuses {reply.statuses or 'none'}, "
        f"closed={reply.closed}, "
        f"backend saw {[s.method + ' ' + s.target[:60] for s in seen]}"
    )

    if reply.statuses:
        assert len(reply.statuses) == want, reply.raw[:300]
        for status in reply.statuses:
            assert _matches(status, expect), f"{name}: {status} is not {expect}"
        if reply.statuses[0] >= 400 and not seen:
            # zotlb answered itself (the backend saw nothing): OCI error JSON,
            # parser rejections included.
            head, _, body = reply.raw.partition(b"\r\n\r\n")
            assert b"docker-distribution-api-version" in head.lower(), head
            first = json.JSONDecoder().raw_decode(body.decode("latin-1"))[0]
            assert first["errors"][0]["code"], body[:200]
    else:
        assert _matches(None, expect), (
            f"{name}: closed without a response, expected {expect}"
        )
    assert _count_ok(len(seen), case.expected("backend", mode)), [
        s.target for s in seen
    ]
    if seen and "backend-target" in case.meta:
        assert seen[0].target == case.meta["backend-target"]
    if seen and "backend-no-header" in case.meta:
        banned = case.meta["backend-no-header"].lower()
        assert banned not in {k.lower() for k, _ in seen[0].headers}
    for request in seen:
        assert (
            "smuggled" not in request.target
            and "smuggled" not in request.body.decode("latin-1")
        )
    assert other_host.contacts == 0, "zotlb contacted a host that is not a backend"

    # Still alive and serving.
    assert corpus_lb.proc.poll() is None
    assert exchange(corpus_lb.port, ALIVE, 1).statuses == [200]


def test_alive_after_whole_corpus(corpus_lb, other_host) -> None:
    # Runs after the cases of the same zotlb (module scope, declaration order).
    for name in CASES:
        exchange(
            corpus_lb.port, load_case(name).request(other_host.hostport), 1, linger=0.05
        )
    assert corpus_lb.proc.poll() is None
    assert exchange(corpus_lb.port, ALIVE, 1).statuses == [200]
    status, headers, _ = conftest.http("GET", corpus_lb.url + "/v2/")
    assert (
        status == 200 and headers["Docker-Distribution-API-Version"] == "registry/2.0"
    )
    assert other_host.contacts == 0
    # Parser rejections are one info line each, never an error with a traceback.
    wait_until(lambda: corpus_lb.events("request.malformed"), 5, "request.malformed")
    assert "Traceback" not in "".join(corpus_lb.lines)


@needs_registry
def test_invalid_names_and_digests_reach_a_real_registry_as_4xx(
    registry_factory, zotlb_factory, other_host
) -> None:
    reg = registry_factory("a")
    lb = zotlb_factory([reg], replication={"mode": "off"})
    names = [n for n in CASES if n.startswith("invalid-")]
    assert len(names) >= 5
    for name in names:
        data = load_case(name).request(other_host.hostport)
        via_lb = exchange(lb.port, data, 1)
        direct = exchange(reg.port, data, 1)
        print(
            f"{name}: {via_lb.statuses} via zotlb, {direct.statuses} from the registry"
        )
        # Passed on and answered by the registry (the registry's own status,
        # 4xx or even its 500 for an unknown algorithm), never a zotlb error.
        assert via_lb.statuses == direct.statuses, name
        assert via_lb.statuses[0] != 502 and via_lb.statuses[0] != 503
    assert lb.proc.poll() is None
    assert exchange(lb.port, ALIVE, 1).statuses == [200]
