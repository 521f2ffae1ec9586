"""The server moves what it built at start-up out of the garbage collector's reach, so full collections do not walk
the modules, the app and the model's Python objects again every thousand-odd requests, and collects young objects
less often (a request's own objects are freed by reference counting)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_objects_alive_when_the_server_is_ready_are_frozen_once() -> None:
    script = textwrap.dedent("""
        import asyncio, gc, json
        from deepseek_server.app import create_app
        from deepseek_server.engine.noop import NoopEngine
        from deepseek_server.settings import ServerSettings

        async def main():
            counts = {"before": gc.get_freeze_count()}
            settings = ServerSettings(model_name="m", auth="disabled")
            app = create_app(settings, engine=NoopEngine(model_name="m"))
            async with app.router.lifespan_context(app):
                counts["ready"] = gc.get_freeze_count()
                counts["threshold"] = gc.get_threshold()[0]
                seen = []
                gc.callbacks.append(lambda phase, info: seen.append(phase))
                for _ in range(60_000):  # cycles that nothing collects by hand: the collector still runs on its own
                    cycle = []
                    cycle.append(cycle)
                del cycle
                counts["automatic"] = seen.count("stop")
                garbage = [[] for _ in range(1000)]
                for item in garbage:
                    item.append(item)  # cycles made after start-up
                del garbage, item
                counts["collected"] = gc.collect()
                second = create_app(settings, engine=NoopEngine(model_name="m"))
                async with second.router.lifespan_context(second):
                    counts["second"] = gc.get_freeze_count()
            print(json.dumps(counts))

        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    counts = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    assert counts["before"] == 0
    assert counts["ready"] > 10_000, counts  # the imported modules and the app, at least
    assert counts["collected"] >= 1000, counts  # what is made later is still collected
    assert counts["threshold"] == 50_000, counts
    assert counts["automatic"] >= 1, counts
    assert counts["second"] <= counts["ready"], counts  # once per process: the second app's objects are not frozen
