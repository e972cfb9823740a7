"""`slotserve serve`: start (or join) Ray, make sure a bundle exists, deploy, block.

With no arguments: a local Ray instance bound to 127.0.0.1 (dashboard on
127.0.0.1:8265), the demo bundle built and published if the store has none, loaded as
live, the API on 127.0.0.1:8000. Ctrl-C (or SIGTERM) shuts the app down cleanly. The
desired state (live, previous, candidate, rollout) is persisted by the controller, so
the next `slotserve serve` comes back with the same bundles.

Every option can also come from `--config FILE` (YAML or JSON, keys with `-` or `_`);
a flag wins over the file, the file over the default. An unknown key or a value of the
wrong type stops the command before anything starts (slotserve.serve_options).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import signal
import socket
import sys
import threading
import time

from slotserve.serve_options import VALID_KEYS, OptionError, ServeOptions, resolve_options  # noqa: F401

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


def keep_ray_on_loopback() -> None:
    """Make the local Ray instance we start listen on 127.0.0.1 only.

    On Linux Ray replaces the node IP 127.0.0.1 with the machine's outside address
    (ray._private.services.resolve_ip_for_localhost) and then binds its gRPC servers
    (GCS, raylet, workers), agents and metrics exporters there or on every interface.
    It keeps 127.0.0.1 only when it believes the node cannot join a multi-node cluster:
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read when ray is imported (so the constant is
    set too, in case ray already was). A local instance never takes other nodes; a
    cluster is joined with --address instead.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False


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
        from slotserve.bundles.demo import publish_demo
        print(f"building the demo bundle into {store.root} ...", flush=True)
        m = publish_demo(store, DEMO_NAME)
        print(f"published {getattr(m, 'ref', m)}", flush=True)
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

    from slotserve.auth import digest, ensure_token
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

    if started_ray:
        keep_ray_on_loopback()
    import ray

    print("starting Ray ..." if started_ray else f"connecting to Ray at {opts.address} ...", flush=True)
    try:
        if started_ray:
            ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=opts.dashboard_port,
                     _node_ip_address="127.0.0.1", namespace="slotserve", logging_level="WARNING",
                     runtime_env={"env_vars": {"SLOTSERVE_HOME": str(store.root)}})
        else:
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
            return _fail(problem)
        raise
    finally:
        ray.shutdown()  # a local Ray takes Serve and the controller with it
    print("stopped.")
    return 0


def _serve(opts: ServeOptions, store, bundle: str | None, token_sha256: str, token_where: str,
           started_ray: bool) -> None:
    """Deploy the app on the connected Ray, print where it is, block until stopped."""
    import ray
    from ray import serve

    from slotserve.app import build_app
    from slotserve.controller import get_or_create

    # SIGTERM from here on means a clean stop (after start-up, if it comes during it), not
    # a kill that leaves the app deployed.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
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
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("\nshutting down ...", flush=True)
    serve.delete(opts.name)  # replicas finish their in-flight requests


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
