"""Events posted in the background (modeldeploy.kube.client.EventSink): order per object, failures dropped,
everything queued posted before close returns."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from modeldeploy.kube.client import EventSink


def md(name: str) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name}}


def test_event_sink_posts_in_order_per_object_without_blocking_the_caller() -> None:
    async def main() -> tuple[list[tuple[str, str]], int]:
        posted: list[tuple[str, str]] = []
        gate = asyncio.Event()

        async def post(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
            await gate.wait()
            posted.append((obj["metadata"]["name"], reason))

        sink = EventSink(post, lanes=3)
        for i in range(20):
            for name in ("a", "b", "c"):
                sink.post(md(name), "Normal", f"R{i}", "m")  # returns at once: nothing posted yet
        queued = sink.pending()
        gate.set()
        await sink.close()
        return posted, queued

    posted, queued = asyncio.run(asyncio.wait_for(main(), 5))
    assert queued >= 57  # each lane's first post may have been taken already, none finished
    assert len(posted) == 60
    for name in ("a", "b", "c"):
        assert [r for n, r in posted if n == name] == [f"R{i}" for i in range(20)]


def test_event_sink_logs_and_drops_a_failed_post(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> list[str]:
        posted: list[str] = []

        async def post(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
            if reason == "Bad":
                raise RuntimeError("refused")
            posted.append(reason)

        sink = EventSink(post, lanes=1)
        for reason in ("First", "Bad", "Last"):
            sink.post(md("a"), "Normal", reason, "m")
        await sink.close()
        return posted

    with caplog.at_level(logging.WARNING, logger="modeldeploy.kube.client"):
        assert asyncio.run(asyncio.wait_for(main(), 5)) == ["First", "Last"]
    assert any("could not post event Bad for a: refused" in r.getMessage() for r in caplog.records)


def test_event_sink_close_gives_up_after_its_drain_time(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async def post(obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
            await asyncio.Event().wait()  # never answers

        sink = EventSink(post, lanes=1, drain_seconds=0.05)
        sink.post(md("a"), "Normal", "Stuck", "m")
        sink.post(md("a"), "Normal", "Queued", "m")
        await sink.close()

    with caplog.at_level(logging.WARNING, logger="modeldeploy.kube.client"):
        asyncio.run(asyncio.wait_for(main(), 5))
    assert any("1 events not posted at shutdown" in r.getMessage() for r in caplog.records)
