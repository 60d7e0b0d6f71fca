"""OpenAI's Conversations API (``/v1/conversations``): a conversation kept by the service, its items listed, added and
deleted, and continued by a Responses request that names it (``conversation``).

A conversation is its metadata and its items, the Responses API's input and output items (messages, function calls
and their outputs), each with an id. A Responses request that names one is answered after its items (as if they
came first in its ``input``), and its input and output items are then added to it. Conversations live in the
service's store of Responses (``response_store.py``: the same budget, least recently used first out, in memory or
in ``responses_store_path``, one store for every process of the API), as entries whose ``response`` is the
conversation object and whose ``items`` are its items; every change is one edit of the entry made by the store
itself (``response_store.EDITS``), so two requests adding to a conversation at once both land.
"""
from __future__ import annotations

import re
import time
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from typing_extensions import Annotated

from vlmguard.errors import InvalidInput
from vlmguard.responses_schema import ResponsesRequest
from vlmguard.workers.response_store import StoredResponse
from vlmguard.workers.responses_api import ChatForm, chat_request, new_id

MAX_ADDED_ITEMS = 20  # items a create or add call may carry (OpenAI's limit)

MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: Optional[list[Any]] = Field(None, max_length=MAX_ADDED_ITEMS)
    metadata: Optional[Metadata] = None


class ConversationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: Metadata


class ItemsCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[Any] = Field(min_length=1, max_length=MAX_ADDED_ITEMS)


def items_form(items: list[Any], before: list[dict[str, Any]]) -> ChatForm:
    """The chat request that ``items`` after ``before`` (the conversation's items) mean, as a Responses request's
    ``input`` would: what checks that they continue it (a message the chat API can take, a function call's output
    after its call). An error names the item as the whole conversation's input (``input.K``: see
    :func:`as_items`)."""
    for j, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"input.{len(before) + j}: an item is a JSON object", param=f"input.{len(before) + j}")
    # (then a question, as the next request will have: a conversation may end with an answer or a call; and a
    # length that any limit holds)
    form = chat_request(ResponsesRequest(input=[*before, *items, {"role": "user", "content": "?"}]))
    form.body["max_tokens"] = 1
    return form


def as_items(text: str, before: int) -> str:
    """``input.K`` of a conversation checked whole, said as the added item it is (``items.(K - before)``)."""
    return re.sub(r"\binput\.(\d+)", lambda m: f"items.{int(m.group(1)) - before}", text)


def new_conversation(items: list[dict[str, Any]], metadata: Optional[dict[str, str]]) -> StoredResponse:
    conv = {"id": new_id("conv"), "object": "conversation", "created_at": int(time.time()),
            "metadata": metadata or {}}
    return StoredResponse(response=conv, messages=[], items=items)


def conversation_messages(entry: StoredResponse) -> list[dict[str, Any]]:
    """A conversation's items as the chat messages a request naming it continues."""
    if not entry.items:
        return []
    return chat_request(ResponsesRequest(input=entry.items)).new_messages


def item_page(items: list[dict[str, Any]], limit: str, order: str, after: Optional[str], owner: str
              ) -> dict[str, Any]:
    """A page of ``items`` as OpenAI lists them: ``limit`` (1-100) items after the item ``after``, oldest first when
    ``order`` is ``asc``, else newest first."""
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        raise InvalidInput(f"limit: {limit!r} is not a number of items from 1 to 100", param="limit")
    if order not in ("asc", "desc"):
        raise InvalidInput(f"order: {order!r} is not asc or desc", param="order")
    n = int(limit)
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [it["id"] for it in items]
        if after not in ids:
            raise InvalidInput(f"after: no item {after!r} in {owner}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:n]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > n}
