"""The self-contained drill's server: the real app, controller and replica on 127.0.0.1
in a thread of this process (no Ray), serving the demo bundle from a temporary store
unless one is given. Stopped and cleaned up on exit, also on failure or Ctrl-C."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Callable

from slotserve.drill.load import DrillError

DEMO = "demo"


class LocalServer:
    """The real app + controller + replica on 127.0.0.1, in a thread of this process
    (no Ray), serving the demo bundle. Context manager: stopped and cleaned up on exit."""

    def __init__(self, store: str | None = None, log: Callable[[str], None] = lambda m: None, *,
                 real: bool = True, need_real: bool = False):
        self.real, self.need_real = real, need_real  # the real demo model (if at hand), or the tiny one
        self._tmp = None if store else tempfile.mkdtemp(prefix="slotserve-drill-")
        self.root = Path(store or self._tmp).expanduser().resolve()
        self.token = secrets.token_urlsafe(24)
        self.log = log
        self.url: str | None = None
        self.live: str | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> "LocalServer":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 300.0) -> None:
        from slotserve.bundles.demo import REAL_DEMO_UNAVAILABLE, publish_demo, publish_real_demo
        from slotserve.bundles.store import Store
        self.log(f"self-contained: demo bundle in {self.root} ...")
        store = Store(self.root)
        m = publish_real_demo(store, DEMO) if self.real else None  # a no-op when it is there
        if m is None:
            if self.need_real:
                raise DrillError(REAL_DEMO_UNAVAILABLE.split(":")[0] + "; this drill needs it "
                                 "(bash scripts/setup.sh installs it)")
            if self.real:
                self.log(f"warning: {REAL_DEMO_UNAVAILABLE}")
            m = publish_demo(store, DEMO)
        self.live = m.ref
        self._thread = threading.Thread(target=self._main, name="slotserve-drill-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) and self._error is None:
            raise DrillError(f"the local server did not start within {timeout_s:.0f}s")
        if self._error is not None:
            raise DrillError(f"the local server failed to start: {type(self._error).__name__}: "
                             f"{self._error}") from self._error
        self.log(f"self-contained: serving {self.live} at {self.url}")

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start(); the thread just ends
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        import uvicorn

        from slotserve.api.auth import digest
        from slotserve.api.routes import create_app
        from slotserve.control.controller import SlotController
        from slotserve.replica import LocalController, Replica, Settings

        ctl = SlotController(str(self.root), app="drill", bundle=self.live)
        settings = Settings(store=str(self.root), app="drill", admin_token_sha256=digest(self.token))
        rep = Replica(settings, LocalController(ctl), replica_id="drill-local")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await rep.start()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            self._server = uvicorn.Server(uvicorn.Config(
                create_app(rep), log_level="warning", access_log=False, lifespan="off",
                timeout_graceful_shutdown=5))
            serve = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
            while not self._server.started and not serve.done():
                await asyncio.sleep(0.02)
            self._ready.set()
            await serve
        finally:
            await rep.stop()
            ctl.stop()
            _close_slots(rep.mgr)
            sock.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _close_slots(mgr) -> None:
    """Free every slot's engine (threads, KV pools) of the local server; if closing fails,
    release what is left slot by slot."""
    try:
        mgr.close()
        return
    except Exception:
        pass
    for slot in ("candidate", "previous", "live"):
        try:
            mgr.release(slot)
        except Exception:
            pass
