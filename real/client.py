"""One streaming ``/v1/completions`` call with a token-id prompt, timed token by token.

The body forces exactly ``max_tokens`` output tokens (``ignore_eos``), asks for the token ids of each
chunk (a chunk may carry several tokens when the server batches deltas) and for the final usage,
whose ``prompt_tokens_details.cached_tokens`` is the server's own count of prefix-cache hits.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp


class CallError(Exception):
    """A call that did not complete. ``transport``: the connection broke or timed out (the server may be
    dead), as opposed to the server answering with an error."""

    def __init__(self, message: str, *, transport: bool):
        super().__init__(message)
        self.transport = transport


@dataclass
class CallOutcome:
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_times: list[float] = field(default_factory=list)  # one entry per generated token


async def stream_completion(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int,
                            clock: Callable[[], float], priority: int = 0) -> CallOutcome:
    """Send one call to the server at ``url``; times come from ``clock`` (the executor's run clock). A ``priority``
    other than 0 needs a server started with ``--scheduling-policy priority`` (vLLM refuses it otherwise)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    if priority:
        body["priority"] = priority
    token_times: list[float] = []
    usage: dict | None = None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                raise CallError(f"HTTP {resp.status} from {url}: {(await resp.text())[:500]}", transport=False)
            async for event in _sse_events(resp):
                now = clock()
                for choice in event.get("choices") or ():
                    ids = choice.get("token_ids")
                    token_times.extend([now] * (len(ids) if ids is not None else 1))
                usage = event.get("usage") or usage
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
        raise CallError(f"connection to {url} failed: {type(e).__name__}: {e}", transport=True) from None
    if usage is None:
        raise CallError(f"stream from {url} ended without a usage record", transport=True)
    done = clock()
    completion = int(usage.get("completion_tokens", 0))
    if completion != max_tokens:
        raise CallError(f"{url} generated {completion} tokens, not max_tokens={max_tokens} (prompt of "
                        f"{len(prompt)} tokens hit max_model_len?)", transport=False)
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    return CallOutcome(first_token_s=token_times[0] if token_times else done, finish_s=done,
                       prompt_tokens=int(usage.get("prompt_tokens", len(prompt))), completion_tokens=completion,
                       cached_tokens=cached, token_times=token_times)


async def _sse_events(resp: aiohttp.ClientResponse):
    """Server-sent events as dicts, up to ``[DONE]``. Lines are split by hand because the first chunk
    echoes the whole prompt, which can exceed aiohttp's line-length limit."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)
    raise CallError("stream ended before [DONE]", transport=True)


async def fetch_text(session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0) -> str:
    """GET a small page (``/metrics``); transport failures become CallError(transport=True)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise CallError(f"HTTP {resp.status} from {url}", transport=False)
            return await resp.text()
    except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
        raise CallError(f"GET {url} failed: {type(e).__name__}: {e}", transport=True) from None
