"""zotlb's own failures, each mapped to the registry error a client expects."""

from __future__ import annotations

import json

from aiohttp import web

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"


class ProxyError(Exception):
    """A request zotlb answers itself, as an OCI error JSON body."""

    status = 502
    code = "UNAVAILABLE"

    def __init__(self, message: str, detail: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def response(self) -> web.Response:
        return oci_error(self.status, self.code, self.message, self.detail)


class NoHealthyBackend(ProxyError):
    status = 503
    code = "UNAVAILABLE"


class BackendTimeout(ProxyError):
    status = 504
    code = "UNAVAILABLE"


class BackendBroken(ProxyError):
    status = 502
    code = "UNAVAILABLE"


class BadRequest(ProxyError):
    status = 400
    code = "UNSUPPORTED"


class NotFound(ProxyError):
    status = 404
    code = "NAME_UNKNOWN"


class UploadUnknown(ProxyError):
    status = 404
    code = "BLOB_UPLOAD_UNKNOWN"


def oci_error(
    status: int, code: str, message: str, detail: object = None
) -> web.Response:
    error: dict[str, object] = {"code": code, "message": message}
    if detail is not None:
        error["detail"] = detail
    return web.Response(
        status=status,
        body=json.dumps({"errors": [error]}).encode(),
        content_type="application/json",
        headers={API_VERSION_HEADER: API_VERSION},
    )
