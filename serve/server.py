"""`slotserve serve`: start (or join) Ray, make sure a bundle exists, deploy, block.

With no arguments: a local Ray instance (dashboard on 127.0.0.1:8265), the demo bundle
built and published if the store has none, loaded as live, the API on
127.0.0.1:8000. Ctrl-C shuts the app down cleanly. The desired state (live, previous,
candidate, rollout) is persisted by the controller, so the next `slotserve serve`
comes back with the same bundles.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

DEMO_NAME = "demo"


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve bundles over an OpenAI-compatible HTTP API (Ray Serve)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--bundle", help="bundle to serve as live when no state is persisted "
                                    "(default: the persisted live, else the demo bundle)")
    p.add_argument("--replicas", type=int, default=None, help="number of replicas (default 1)")
    p.add_argument("--address", help="an existing Ray cluster (e.g. ray://host:10001 or auto); "
                                     "default: start a local one")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--config", help="YAML/JSON file with any of these options (flags win)")
    p.add_argument("--store", help="bundle store path shared by every node (default $SLOTSERVE_HOME)")
    p.add_argument("--memory-budget", help="cap on what the slots may hold per replica, e.g. 2GiB")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--name", default="slotserve", help="Serve application name")
    p.add_argument("--served-name", help="logical model name clients send (default: live bundle's name)")
    p.set_defaults(func=run)


def _load_config(path: str | None) -> dict:
    if not path:
        return {}
    import yaml
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of options")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _opt(args, cfg: dict, name: str, default=None):
    v = getattr(args, name, None)
    if v is not None:
        return v
    return cfg.get(name, default)


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


def run(args: argparse.Namespace) -> int:
    cfg = _load_config(args.config)
    from slotserve.auth import digest, ensure_token
    from slotserve.bundles.manifest import BundleError
    from slotserve.bundles.store import Store

    store_path = _opt(args, cfg, "store")
    if store_path:
        os.environ["SLOTSERVE_HOME"] = os.path.abspath(os.path.expanduser(store_path))
    try:
        store = Store(store_path)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host, port = _opt(args, cfg, "host", "127.0.0.1"), int(_opt(args, cfg, "port", 8000))
    app_name = _opt(args, cfg, "name", "slotserve")
    device = _opt(args, cfg, "device") or _default_device()
    token, token_where = ensure_token(store.root)
    persisted = (store.root / "serve" / f"{app_name}.json").exists()
    try:
        bundle = _opt(args, cfg, "bundle")
        if not persisted or bundle:
            bundle = ensure_bundle(store, bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from slotserve.app import build_app
    from slotserve.controller import get_or_create

    address = _opt(args, cfg, "address")
    started_ray = address is None
    dash_port = int(_opt(args, cfg, "dashboard_port", 8265))
    print("starting Ray ..." if started_ray else f"connecting to Ray at {address} ...", flush=True)
    if started_ray:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash_port,
                 _node_ip_address="127.0.0.1", namespace="slotserve", logging_level="WARNING",
                 runtime_env={"env_vars": {"SLOTSERVE_HOME": str(store.root)}})
    else:
        ray.init(address=address, namespace="slotserve", logging_level="WARNING")
    serve.start(http_options={"host": host, "port": port})

    controller = get_or_create(str(store.root), app_name, bundle,
                               force_bundle=_opt(args, cfg, "bundle") is not None)
    settings = {"store": str(store.root), "device": device, "app": app_name,
                "admin_token_sha256": digest(token), "bundle": bundle}
    if (mb := _opt(args, cfg, "memory_budget")) is not None:
        settings["memory_budget"] = mb
    if (sn := _opt(args, cfg, "served_name")) is not None:
        settings["served_name"] = sn
    replicas = _opt(args, cfg, "replicas")
    if replicas is not None:
        settings["num_replicas"] = int(replicas)
    if "autoscaling_config" in cfg:
        settings["autoscaling_config"] = cfg["autoscaling_config"]

    stop_progress = threading.Event()
    progress = threading.Thread(target=_progress, args=(controller, stop_progress), daemon=True)
    progress.start()
    try:
        serve.run(build_app(settings), name=app_name, route_prefix="/", blocking=False)
    finally:
        stop_progress.set()
        progress.join(2)
    url = f"http://{host}:{port}"
    state = ray.get(controller.admin_state.remote())
    live = (state["desired"].get("live") or {}).get("ref")
    prev = (state["desired"].get("previous") or {}).get("ref")
    print(f"\nslotserve is serving {live}" + (f" (previous {prev} warm)" if prev else ""))
    print(f"  API        {url}/v1/chat/completions   (model: {state.get('served_name') or '?'})")
    print(f"  health     {url}/healthz")
    print(f"  admin API  {url}/admin/state   (Bearer token from {token_where})")
    if started_ray:
        print(f"  dashboard  http://127.0.0.1:{dash_port}")
    print(f"  store      {store.root}")
    print("Ctrl-C to stop.", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    print("\nshutting down ...", flush=True)
    try:
        serve.delete(app_name)  # replicas finish their in-flight requests
    finally:
        ray.shutdown()          # a local Ray takes Serve and the controller with it
    print("stopped.")
    return 0


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
