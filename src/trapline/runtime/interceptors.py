"""The runtime's server interceptors.

* :class:`ErrorInterceptor` is the one place where domain errors become gRPC status codes
  (``trapline.runtime.errors``), where a request id is attached to the call's log lines, and where
  calls that arrive before the service is ready are refused with UNAVAILABLE. Anything unexpected
  becomes INTERNAL with a generic message; the traceback goes to the server log only.
* :class:`AuthInterceptor` checks ``authorization: Bearer <token>`` when tokens are configured.
  Health and reflection stay open, so probes and ``grpcurl list`` work without a token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from . import errors
from .logs import new_request_id, request_id_var

log = logging.getLogger("trapline.runtime")

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
INTERNAL_MESSAGE = "internal error"


def _wrap(handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_stream: Callable) -> grpc.RpcMethodHandler:
    """Return a copy of ``handler`` whose behaviour is wrapped, for each of the four call shapes."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


def _metadata(details: grpc.HandlerCallDetails) -> dict[str, str]:
    return {k.lower(): v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """Map an exception to (code, client-safe message, trailing metadata with rich details)."""
    if isinstance(exc, errors.TraplineError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.UNKNOWN)
        message = str(exc)
        status = status_pb2.Status(code=code.value[0], message=message)
        if exc.field and isinstance(exc, errors.InvalidArgument):
            bad = error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.message)]
            )
            detail = any_pb2.Any()
            detail.Pack(bad)
            status.details.append(detail)
        return code, message, ((STATUS_DETAILS_KEY, status.SerializeToString()),)
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=INTERNAL_MESSAGE)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, ((STATUS_DETAILS_KEY, status.SerializeToString()),)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Request ids, readiness gate and the domain-error -> status-code mapping, for every RPC."""

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        self._is_ready = is_ready

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        open_method = method.startswith(OPEN_PREFIXES)
        request_id = _metadata(handler_call_details).get(REQUEST_ID_KEY) or new_request_id()
        is_ready = self._is_ready

        async def fail(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
            code, message, trailers = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("%s failed", method, exc_info=exc)
            else:
                log.info("%s -> %s: %s", method, code.name, message)
            context.set_trailing_metadata(trailers + ((REQUEST_ID_KEY, request_id),))
            await context.abort(code, message)

        def gate() -> None:
            if not open_method and not is_ready():
                raise errors.Unavailable("service is starting (models or stores not ready yet); retry shortly")

        def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = request_id_var.set(request_id)
                try:
                    gate()
                    return await behavior(request, context)
                except (grpc.aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                    await fail(context, exc)
                finally:
                    request_id_var.reset(token)

            return wrapper

        def wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = request_id_var.set(request_id)
                try:
                    gate()
                    async for response in behavior(request, context):
                        yield response
                except (grpc.aio.AbortError, grpc.RpcError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await fail(context, exc)
                finally:
                    request_id_var.reset(token)

            return wrapper

        return _wrap(handler, wrap_unary, wrap_stream)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without an accepted bearer token (UNAUTHENTICATED). Health and reflection stay open."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)

    def _accepted(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("bearer "):
            return False
        presented = header[7:].strip().encode()
        # Compare against every token so the time taken does not reveal which one nearly matched.
        return any([hmac.compare_digest(presented, token) for token in self._tokens])

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        if self._accepted(_metadata(handler_call_details).get("authorization")):
            return handler

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
            yield  # pragma: no cover - makes this an async generator

        return _wrap(handler, lambda _b: deny_unary, lambda _b: deny_stream)
