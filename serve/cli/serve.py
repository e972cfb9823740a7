"""`slotserve serve`: start (or join) Ray, make sure a bundle exists, deploy, block.

With no arguments: a local Ray instance bound to 127.0.0.1 (dashboard on
127.0.0.1:8265), the demo bundle built and published if the store has none, loaded as
live, the API on 127.0.0.1:8000. Ctrl-C (or SIGTERM) shuts the app down cleanly. The
desired state (live, previous, candidate, rollout) is persisted by the controller, so
the next `slotserve serve` comes back with the same bundles.

Every option can also come from `--config FILE` (YAML or JSON, keys with `-` or `_`);
a flag wins over the file, the file over the default. An unknown key or a value of the
wrong type stops the command before anything starts (slotserve.cli.serve_options).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import socket
import sys
import threading
import time

from slotserve.cli.local_ray import neutral_cwd, start_local_ray
from slotserve.cli.serve_options import VALID_KEYS, OptionError, ServeOptions, resolve_options

DEMO_NAME = "demo"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve bundles over an OpenAI-compatible HTTP API (Ray Serve)",
                              description=__doc__.splitlines()[0])
    # No defaults here: None means "not given", so a --config file can supply the value
    # (the defaults live in ServeOptions).
    p.add_argument("--bundle", help="bundle to serve as live; it replaces a different persisted live, "
                                    "which stays warm as previous (default: the persisted live, else the demo bundle)")
    p.add_argument("--replicas", type=int, help="number of replicas (default 1)")
    p.add_argument("--address", help="an existing Ray cluster (e.g. ray://host:10001 or auto); "
                                     "default: start a local one bound to 127.0.0.1")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--dashboard-port", type=int, help="Ray dashboard port of a local Ray (default 8265)")
    p.add_argument("--config", help=f"YAML/JSON file with any of these options (flags win); "
                                    f"keys: {', '.join(VALID_KEYS)}")
    p.add_argument("--store", help="bundle store path shared by every node (default $SLOTSERVE_HOME)")
    p.add_argument("--memory-budget", help="cap on what the slots may hold per replica, e.g. 2GiB")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--name", help="Serve application name (default slotserve)")
    p.add_argument("--served-name", help="logical model name clients send (default: live bundle's name)")
    p.set_defaults(func=run)


# ---------------------------------------------------------------- ports

def port_problem(host: str, port: int, what: str, flag: str) -> str | None:
    """None if (host, port) can be listened on now, else a one-line error that says
    how to choose another. A check, not a reservation: the bind itself is handled too."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        return f"{what}: cannot resolve host {host!r} ({exc.strerror}); choose another with --host"
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the real servers do: a port in TIME_WAIT is free, one with a listener is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{what}: {host}:{port} is already in use; choose another port with {flag}"
            return f"{what}: cannot listen on {host}:{port} ({exc.strerror}); choose another with --host"
    return None


def bind_failure(exc: BaseException) -> str | None:
    """The one-line error for Ray failing to bind one of our ports after the check
    passed (another process took it in between), else None."""
    text = str(exc)
    if m := re.search(r"Failed to bind to address '([^']+)'", text):  # Serve's HTTP proxy
        return f"HTTP API: cannot listen on {m.group(1)} (in use or not available); choose another port with --port"
    if m := re.search(r"Failed to bind to (\S+) because it's already occupied", text):  # dashboard
        return f"Ray dashboard: {m.group(1)} is already in use; choose another port with --dashboard-port"
    return None


def _default_device() -> str:
    try:
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def ensure_bundle(store, ref: str | None) -> str:
    """The ref to serve: `ref` if given (must exist), else the demo bundle (built if missing)."""
    if ref:
        store.resolve(ref)  # raises BundleError naming what exists
        return ref
    if not store.registry.list_bundles(DEMO_NAME):
        from slotserve.bundles.demo import REAL_DEMO_UNAVAILABLE, publish_demo, publish_real_demo
        print(f"building the demo bundle into {store.root} (SmolLM2-135M-Instruct, converted once) ...", flush=True)
        m = publish_real_demo(store, DEMO_NAME)
        if m is None:
            print(f"warning: {REAL_DEMO_UNAVAILABLE}", file=sys.stderr, flush=True)
            m = publish_demo(store, DEMO_NAME)
        print(f"published {m.ref}", flush=True)
    return f"{DEMO_NAME}:{store.registry.latest(DEMO_NAME).version}"


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- the command

def run(args: argparse.Namespace) -> int:
    try:
        opts = resolve_options(args)
    except OptionError as exc:
        return _fail(str(exc))
    started_ray = opts.address is None
    # Ports first: a busy port should cost a second, not a Ray start and a traceback.
    # (With --address the proxy runs wherever the cluster puts it: nothing to check here.)
    if started_ray:
        for problem in (port_problem(opts.host, opts.port, "HTTP API", "--port"),
                        port_problem("127.0.0.1", opts.dashboard_port, "Ray dashboard", "--dashboard-port")):
            if problem:
                return _fail(problem)

    from slotserve.api.auth import digest, ensure_token
    from slotserve.bundles.manifest import BundleError
    from slotserve.bundles.store import Store

    if opts.store:
        os.environ["SLOTSERVE_HOME"] = os.path.abspath(os.path.expanduser(opts.store))
    try:
        store = Store(opts.store)
        token, token_where = ensure_token(store.root)
        bundle = opts.bundle
        if not (store.root / "serve" / f"{opts.name}.json").exists() or bundle:
            bundle = ensure_bundle(store, bundle)
    except BundleError as exc:
        return _fail(str(exc))

    import ray

    print("starting Ray ..." if started_ray else f"connecting to Ray at {opts.address} ...", flush=True)
    workdir = store.root / "run"  # an empty folder: the workers' view of "the current directory"
    try:
        if started_ray:
            become_subreaper()
            start_local_ray(workdir, include_dashboard=True, dashboard_host="127.0.0.1",
                            dashboard_port=opts.dashboard_port, namespace="slotserve", logging_level="WARNING",
                            runtime_env={"env_vars": {"SLOTSERVE_HOME": str(store.root)}})
        else:
            with neutral_cwd(workdir):
                ray.init(address=opts.address, namespace="slotserve", logging_level="WARNING")
    except ValueError as exc:
        if problem := bind_failure(exc):
            return _fail(problem)
        raise
    try:
        if started_ray and (ip := ray.util.get_node_ip_address()) != "127.0.0.1":
            print(f"warning: Ray took node address {ip}: its internal ports listen there, "
                  f"not only on 127.0.0.1 (firewall them)", file=sys.stderr)
        _serve(opts, store, bundle, digest(token), token_where, started_ray)
    except Exception as exc:
        if problem := bind_failure(exc):
            _stop_ray(started_ray)
            return _fail(problem)
        _stop_ray(started_ray)
        raise
    _stop_ray(started_ray)
    print("stopped.", flush=True)
    return 0


# ---------------------------------------------------------------- stopping

# How long each step of a stop may take: together well under the 10 s that systemd,
# `docker stop` and Kubernetes give a process before SIGKILL.
DRAIN_S = 5.0      # serve.delete: replicas finish their in-flight requests
SHUTDOWN_S = 2.0   # ray.shutdown: Ray stops the processes it started
KILL_S = 1.5       # whatever is left gets SIGTERM, then SIGKILL after this


def _bounded(fn, seconds: float) -> bool:
    """Run fn() in a daemon thread; True if it returned within `seconds`. A hung Ray
    call (its raylet already gone) must not hold the stop."""
    done = threading.Event()

    def call():
        try:
            fn()
        except Exception:
            pass
        finally:
            done.set()
    threading.Thread(target=call, daemon=True).start()
    return done.wait(seconds)


def become_subreaper() -> None:
    """Linux: orphans of our descendants are re-parented to this process, not to init.

    When a signal reaches the whole process group (systemd's KillMode=control-group, a
    terminal's `kill -- -PGID`), the raylet dies at once and the Ray workers it started
    are orphaned; as their subreaper we can still find and stop them (end_descendants)."""
    if sys.platform.startswith("linux"):
        import ctypes
        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def ray_is_dying() -> bool:
    """True when a daemon that our local Ray started (gcs_server, raylet, ...) has already
    exited: the stop signal reached Ray too, and nothing graceful will answer."""
    import psutil
    try:
        return any(c.status() == psutil.STATUS_ZOMBIE for c in psutil.Process().children())
    except psutil.Error:
        return True


def end_descendants(grace: float = KILL_S) -> None:
    """SIGTERM every process below this one, SIGKILL those still there after `grace`
    seconds, and reap them: no Ray process outlives `slotserve serve`."""
    import psutil
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


def _stop_ray(started_ray: bool) -> None:
    """Disconnect from Ray; a local Ray is stopped with everything it started, within
    SHUTDOWN_S + 2 * KILL_S seconds even if Ray no longer answers."""
    import ray
    stopped = _bounded(ray.shutdown, SHUTDOWN_S)  # a local Ray takes Serve and the controller with it
    if started_ray:
        end_descendants()
    if not stopped:
        # ray.shutdown is still hung in its thread, and Ray's atexit hook would hang the
        # same way: leave now (everything we started is gone already).
        print("stopped (Ray did not answer; its processes were ended).", flush=True)
        sys.stderr.flush()
        os._exit(0)


def _serve(opts: ServeOptions, store, bundle: str | None, token_sha256: str, token_where: str,
           started_ray: bool) -> None:
    """Deploy the app on the connected Ray, print where it is, block until stopped."""
    from ray import serve

    # SIGTERM from here on is Ctrl-C: a clean stop, during start-up too, not a kill that
    # leaves the app deployed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        _deploy_and_wait(opts, store, bundle, token_sha256, token_where, started_ray)
    except KeyboardInterrupt:
        pass
    # One stop at a time: a second signal (systemd and `kill -- -PGID` signal every
    # process, and some send SIGINT too) must not interrupt the bounded stop below.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("\nshutting down ...", flush=True)
    # Replicas finish their in-flight requests, unless the signal reached Ray as well.
    if not (started_ray and ray_is_dying()) and not _bounded(lambda: serve.delete(opts.name), DRAIN_S):
        print(f"  the app did not drain within {DRAIN_S:.0f} s; stopping anyway", flush=True)


def _interrupt(*_):
    raise KeyboardInterrupt


def _deploy_and_wait(opts: ServeOptions, store, bundle: str | None, token_sha256: str, token_where: str,
                     started_ray: bool) -> None:
    import ray
    from ray import serve

    from slotserve.app import build_app
    from slotserve.control.controller import get_or_create

    serve.start(http_options={"host": opts.host, "port": opts.port})
    controller = get_or_create(str(store.root), opts.name, bundle, force_bundle=opts.bundle is not None)
    settings = {"store": str(store.root), "device": opts.device or _default_device(), "app": opts.name,
                "admin_token_sha256": token_sha256, "bundle": bundle}
    if opts.memory_budget is not None:
        settings["memory_budget"] = opts.memory_budget
    if opts.served_name is not None:
        settings["served_name"] = opts.served_name
    if opts.replicas is not None:
        settings["num_replicas"] = opts.replicas
    if opts.autoscaling_config is not None:
        settings["autoscaling_config"] = opts.autoscaling_config

    stop_progress = threading.Event()
    progress = threading.Thread(target=_progress, args=(controller, stop_progress), daemon=True)
    progress.start()
    try:
        serve.run(build_app(settings), name=opts.name, route_prefix="/", blocking=False)
    finally:
        stop_progress.set()
        progress.join(2)
    url = f"http://{opts.host}:{opts.port}"
    state = ray.get(controller.admin_state.remote())
    live = (state["desired"].get("live") or {}).get("ref")
    prev = (state["desired"].get("previous") or {}).get("ref")
    print(f"\nslotserve is serving {live}" + (f" (previous {prev} warm)" if prev else ""))
    print(f"  API        {url}/v1/chat/completions   (model: {state.get('served_name') or '?'})")
    print(f"  health     {url}/healthz")
    print(f"  admin API  {url}/admin/state   (Bearer token from {token_where})")
    if started_ray:
        print(f"  dashboard  http://127.0.0.1:{opts.dashboard_port}")
    print(f"  store      {store.root}")
    print("Ctrl-C to stop.", flush=True)
    while True:
        signal.pause()  # until SIGINT / SIGTERM raise KeyboardInterrupt


def _progress(controller, stop: threading.Event) -> None:
    """Print what replicas are loading until the app is up."""
    import ray
    last = None
    t0 = time.time()
    while not stop.wait(0.5):
        try:
            st = ray.get(controller.admin_state.remote(), timeout=2)
        except Exception:
            continue
        reps = st.get("replicas", [])
        parts = [f"{r['id'][:8]}: " + (f"loading {r['loading']}" if r.get("loading")
                                       else ("ready" if r.get("ready") else "starting"))
                 for r in reps]
        line = "; ".join(parts) or "starting replicas"
        if line != last:
            print(f"  [{time.time() - t0:5.1f}s] {line}", flush=True)
            last = line
