"""The upload limit, enforced while the body arrives: an oversized upload is never spooled whole."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# multipart framing and the small form fields around the photo
_SLACK = 64 * 1024


class BodyLimitMiddleware:
    """Answers 413 to a request whose body passes `limit` bytes (Content-Length or counted)."""

    def __init__(self, app: ASGIApp, limit: int, detail: str):
        self.app = app
        self.limit = limit + _SLACK
        self.detail = detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen = [0]
        over = [False]
        started = [False]

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    over[0] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if over[0]:  # the app saw a cut-off body; it answers 413, not what it made of that
                if not started[0]:
                    started[0] = True
                    await self._refuse(send)
                return
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not over[0]:
                raise
            if not started[0]:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": self.detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
