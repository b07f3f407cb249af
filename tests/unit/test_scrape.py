"""/metrics renders the page once per interval however many scrapes come at once (it needs no credentials)."""

from __future__ import annotations

import asyncio
import threading

from bentoformers.observability import scrape


class CountedRender:
    """The real page render, counted, and slow enough that scrapes overlap it."""

    def __init__(self) -> None:
        self.calls, self.threads = 0, set()

    def __call__(self) -> bytes:
        self.calls += 1
        self.threads.add(threading.current_thread().name)
        threading.Event().wait(0.05)
        return f"# render {self.calls}\n".encode() + scrape.latest()


def test_concurrent_scrapes_share_one_render_and_a_fresh_page_is_reused():
    render = CountedRender()
    page = scrape.CachedPage(render, ttl=60)

    async def scrapes() -> list[bytes]:
        return await asyncio.gather(*(page.get() for _ in range(200)))

    pages = asyncio.run(scrapes())
    assert render.calls == 1 and all(p == pages[0] for p in pages) and pages[0].startswith(b"# render 1")
    asyncio.run(scrapes())
    assert render.calls == 1  # within its interval, the page is reused
    assert all(name.startswith("metrics") for name in render.threads)  # not the default executor


def test_a_stale_page_is_rendered_again_and_a_failed_render_is_not_kept():
    render = CountedRender()
    page = scrape.CachedPage(render, ttl=0)
    asyncio.run(page.get())
    asyncio.run(page.get())
    assert render.calls == 2

    def broken() -> bytes:
        raise RuntimeError("collector failed")

    failing = scrape.CachedPage(broken, ttl=60)
    for _ in range(2):
        try:
            asyncio.run(failing.get())
        except RuntimeError:
            pass
        else:
            raise AssertionError("the render's failure must reach the scraper")
