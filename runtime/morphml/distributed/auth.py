"""Token authentication for the master's gRPC service, and reading the token.

Every call to the morphml.Master service must carry metadata `authorization: Bearer <token>`;
the health service is open (Kubernetes probes carry no token). A wrong or missing token is
refused with UNAUTHENTICATED and a message saying where the token comes from.

Imports: grpc, hmac, os only.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "MORPHML_TOKEN"
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenError(ValueError):
    """The token cannot be read (names the file or variable)."""


def read_token(token_file: str | None, env: Mapping[str, str] | None = None) -> str:
    """The token from --token-file, else from $MORPHML_TOKEN; raises TokenError naming both."""
    env = os.environ if env is None else env
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise TokenError(f"--token-file {token_file}: cannot read it ({exc.strerror or exc})") from exc
        if not token:
            raise TokenError(f"--token-file {token_file}: the file is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        raise TokenError(f"no token: pass --token-file FILE or set {TOKEN_ENV}")
    return token


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every non-health call whose bearer token differs from the experiment's (the
    master's grpc.aio server)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given if isinstance(given, bytes) else given.encode(), self._expected):
            return handler
        message = ("invalid token: the worker's token (--token-file or $MORPHML_TOKEN) does not match this "
                   "experiment's token" if given else
                   "missing token: send metadata 'authorization: Bearer <token>' (--token-file or $MORPHML_TOKEN)")
        return _refusing_handler(handler, message)


def _refusing_handler(handler: grpc.RpcMethodHandler[Any, Any], message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request_or_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
