"""A scriptable HTTP backend for protocol details a registry cannot show.

Run as `python echo_backend.py PORT`. Routes:
- /v2/echo: answers the request line and headers it received as JSON, and
  sends back headers a proxy must rewrite or drop.
- /v2/stream/<n>: n MiB, in chunks, with Content-Length.
- /v2/break/<n>: promises n MiB, sends half, then resets the connection.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web

MIB = 1024 * 1024


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    origin = f"http://127.0.0.1:{request.app['port']}"
    return web.Response(
        body=json.dumps(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": [[k, v] for k, v in request.headers.items()],
                "body_length": len(body),
            }
        ).encode(),
        content_type="application/json",
        headers={
            "Location": f"{origin}/v2/somewhere?x=1",
            "WWW-Authenticate": f'Bearer realm="{origin}/token",service="reg"',
            "Connection": "X-Private",
            "X-Private": "hop",
            "Keep-Alive": "timeout=5",
            "Docker-Distribution-API-Version": "registry/2.0",
            "X-Kept": "yes",
        },
    )


async def stream(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["n"]) * MIB
    resp = web.StreamResponse(headers={"Content-Length": str(size)})
    await resp.prepare(request)
    chunk = b"z" * (64 * 1024)
    for _ in range(size // len(chunk)):
        await resp.write(chunk)
    await resp.write_eof()
    return resp


async def broken(request: web.Request) -> web.StreamResponse:
    size = int(request.match_info["n"]) * MIB
    resp = web.StreamResponse(headers={"Content-Length": str(size)})
    await resp.prepare(request)
    chunk = b"z" * (64 * 1024)
    for _ in range(size // len(chunk) // 2):
        await resp.write(chunk)
    assert request.transport is not None
    request.transport.abort()
    return resp


async def broken_chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(b"z" * (256 * 1024))
    assert request.transport is not None
    request.transport.abort()
    return resp


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application()
    app["port"] = port
    app.router.add_route("*", "/v2/echo", echo)
    app.router.add_get("/v2/", lambda r: web.json_response({}))
    app.router.add_get("/v2/stream/{n}", stream)
    app.router.add_get("/v2/break/{n}", broken)
    app.router.add_get("/v2/breakchunked", broken_chunked)
    web.run_app(
        app, host="127.0.0.1", port=port, print=lambda *a: print("ready", flush=True)
    )


if __name__ == "__main__":
    main()
