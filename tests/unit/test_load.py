"""The benchmark's load generator: what it sends after a refusal, and what it reports of refusals."""

import asyncio

import aiohttp
from aiohttp import web

from bentoformers.tools.load import closed_loop


def test_refused_clients_send_again_at_once_or_after_retry_after_as_told():
    async def main():
        seen = 0

        async def refuse(request):
            nonlocal seen
            seen += 1
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "1"})

        app = web.Application()
        app.router.add_post("/embed", refuse)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/embed"
        try:
            async with aiohttp.ClientSession() as session:
                harsh = await closed_loop(session, url, [b"{}"], concurrency=2, seconds=0.6)
                harsh_seen, seen = seen, 0
                polite = await closed_loop(session, url, [b"{}"], concurrency=2, seconds=0.6, honour_retry_after=True)
        finally:
            await runner.cleanup()
        assert harsh["errors"]["503"] == harsh_seen > 20  # at once, again and again
        assert polite["errors"]["503"] == seen == 2  # one each, then a second's wait past the end
        assert polite["elapsed_s"] < 1.0  # the wait is cut at the end of the run
        for point in (harsh, polite):
            assert point["ok"] == 0 and point["p50_ms"] is None
            assert 0 < point["refused_p50_ms"] <= point["refused_p99_ms"] < 500

    asyncio.run(main())
