"""A local Ray instance for slotserve: listening on 127.0.0.1 only, started from an empty
folder so its workers never see the caller's current directory.

`slotserve serve`, the tests and the benchmarks all start Ray through `start_local_ray`;
joining a cluster (`serve --address`) goes through `neutral_cwd` alone.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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


@contextlib.contextmanager
def neutral_cwd(directory: str | os.PathLike):
    """Run the block (a `ray.init`) from `directory`, an empty folder, then come back.

    Ray puts the driver's current directory on every worker's `sys.path` (unless the
    job sets a runtime_env working_dir). Started from the repository root that is
    `./kernels` shadowing Hugging Face's `kernels` package, which transformers imports:
    every replica then fails to load a model. Ray reads the directory once, when it
    connects, and its local processes inherit it as their cwd, so the folder must stay
    (it is kept empty; only the block runs there)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    back = os.getcwd()
    os.chdir(directory)
    try:
        yield directory
    finally:
        os.chdir(back)


def start_local_ray(workdir: str | os.PathLike, **init_kwargs) -> None:
    """`ray.init` a local instance that listens on 127.0.0.1 only and whose workers never
    see the caller's current directory (see neutral_cwd). The CLI, the tests and the
    benchmarks all start Ray through here. Always a new instance (address "local"): without
    it ray.init joins whatever local cluster another process started, with its settings."""
    keep_ray_on_loopback()
    import ray
    init_kwargs.setdefault("address", "local")
    with neutral_cwd(workdir):
        ray.init(_node_ip_address="127.0.0.1", **init_kwargs)
