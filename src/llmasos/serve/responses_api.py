"""OpenAI's Responses API: `POST /v1/responses`, and `GET`/`DELETE /v1/responses/{id}` over stored ones.

A response runs through the gateway exactly as a chat completion does (key, model, guards, limits,
queue, engine, metrics, audit): its items become a conversation, which the model's chat template
renders. A stored response (`store`, the default) keeps its whole conversation, so a request naming it
as `previous_response_id` continues from it; every stored response belongs to the key that made it,
and any other key is told it does not exist (404). A stream sends OpenAI's typed events, the whole
response in `response.created` and again, finished and with its usage, in `response.completed` (or
`response.incomplete`, when it stopped at max_output_tokens or a guard).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from llmasos.outputs import accumulate
from llmasos.serve.errors import APIError, as_api_error
from llmasos.serve.keys import ApiKey
from llmasos.serve.responses_format import (
    ResponseObject,
    ResponsesRequest,
    chat_messages,
    output_items,
)
from llmasos.serve.responses_stream import ResponseStream
from llmasos.serve.sse import ClosingStream
from llmasos.serve.stored_responses import ResponseStore, StoredResponse

if TYPE_CHECKING:
    from llmasos.serve.gateway import Gateway, Job


def _not_found(response_id: str, param: str | None = None) -> APIError:
    code = "previous_response_not_found" if param else "response_not_found"
    return APIError(
        404,
        f"there is no stored response {response_id!r} for this API key (it was never stored, "
        "was made with store=false or by another key, or was deleted)",
        param=param,
        code=code,
    )


def router(server: Gateway) -> APIRouter:
    store = ResponseStore()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        store.close()

    api = APIRouter(lifespan=lifespan)
    auth = Depends(server.authenticate)

    def owner(key: ApiKey | None) -> str | None:
        return key.name if key is not None else None

    async def stored(response_id: str, key: ApiKey | None, param: str | None = None) -> StoredResponse:
        found = await asyncio.to_thread(store.get, response_id, owner(key))
        if found is None:
            raise _not_found(response_id, param)
        return found

    @api.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request, key: ApiKey | None = auth):
        history = []
        if body.previous_response_id is not None:
            previous = await stored(body.previous_response_id, key, "previous_response_id")
            history = previous.conversation()
        items = history + body.input_items()
        job = await server.start(request, key, body, [chat_messages(items, body.instructions)])
        draft = ResponseObject(body)

        async def keep(response: dict) -> None:
            if body.store:
                record = StoredResponse(draft.id, owner(key), response, items)
                await asyncio.to_thread(store.put, record)

        if body.stream:
            events = _stream(server, request, job, draft, keep)
            return ClosingStream(events, on_close=lambda: server.finish(request, job))
        finals = await server.collect(request, job)
        if finals is None:
            return Response(status_code=499)
        completion = finals[0].outputs[0]
        response = draft.finished(completion, output_items(completion, job.tool_plan), job.usage())
        await keep(response)
        return response

    @api.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, key: ApiKey | None = auth):
        return (await stored(response_id, key)).response

    @api.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, key: ApiKey | None = auth):
        if not await asyncio.to_thread(store.delete, response_id, owner(key)):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @api.get("/v1/responses/{response_id}/input_items")
    async def input_items(
        response_id: str,
        key: ApiKey | None = auth,
        order: str = "desc",
        limit: int = 20,
        after: str | None = None,
    ):
        """The items a response was given, newest first as OpenAI lists them (`order=asc`: oldest first),
        a page of `limit` after the item `after`."""
        if order not in ("asc", "desc") or not 1 <= limit <= 100:
            raise APIError(400, "order must be 'asc' or 'desc' and limit between 1 and 100", param="order")
        items = (await stored(response_id, key)).input_items
        items = items if order == "asc" else items[::-1]
        ids = [item["id"] for item in items]
        if after is not None:
            if after not in ids:
                raise APIError(404, f"the response has no input item {after!r}", param="after")
            items = items[ids.index(after) + 1 :]
        page = items[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }

    return api


async def _stream(
    server: Gateway, request: Request, job: Job, draft: ResponseObject, keep
) -> AsyncIterator[str]:
    """The typed events of one response, from the engine's delta outputs (see responses_stream)."""
    stream = ResponseStream(draft, job.tool_plan)
    try:
        for event in stream.start():
            yield event
        deltas = []
        async for _, out in server.outputs(job):
            deltas.append(out)
            for event in stream.feed(out.outputs[0].text):
                yield event
        events, response = stream.finish(accumulate(deltas).outputs[0], job.usage())
        for event in events:
            yield event
        await keep(response)
        yield stream.terminal(response)
    except Exception as exc:
        error = as_api_error(exc)
        request.state.status = error.status
        yield stream.events.error(error)
    finally:
        server.finish(request, job)
