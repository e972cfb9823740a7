"""`slotserve serve`: options (flag > --config file > default), refusals before anything
starts (bad config, busy ports), and one real start that checks where every listener of
the local Ray instance binds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from slotserve.cli import build_parser, main, serve, serve_options

# option -> (flag value, file value, default); flags are strings as on a command line
CASES = {
    "bundle": ("demo:2", "demo:1", None),
    "replicas": ("3", 2, None),
    "address": ("auto", "ray://head:10001", None),
    "host": ("0.0.0.0", "127.0.0.2", "127.0.0.1"),
    "port": ("8021", 8011, 8000),
    "dashboard_port": ("8266", 8267, 8265),
    "store": ("/srv/a", "/srv/b", None),
    "memory_budget": ("2GiB", "1GiB", None),
    "device": ("cuda", "cpu", None),
    "name": ("flagapp", "fileapp", "slotserve"),
    "served_name": ("flag-model", "file-model", None),
}
TYPED = {"replicas": int, "port": int, "dashboard_port": int}


def _opts(tmp_path, argv: list[str], config: dict | None = None) -> serve_options.ServeOptions:
    if config is not None:
        path = tmp_path / "serve.yaml"
        path.write_text("".join(f"{k}: {v!r}\n" if isinstance(v, str) else f"{k}: {v}\n"
                                for k, v in config.items()))
        argv = [*argv, "--config", str(path)]
    return serve_options.resolve_options(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_flag_beats_file_beats_default(tmp_path, name):
    flag, file_value, default = CASES[name]
    flag_argv = [f"--{name.replace('_', '-')}", flag]
    want_flag = TYPED.get(name, str)(flag)
    assert getattr(_opts(tmp_path, flag_argv, {name: file_value}), name) == want_flag
    assert getattr(_opts(tmp_path, [], {name: file_value}), name) == file_value
    assert getattr(_opts(tmp_path, [], {}), name) == default
    assert getattr(_opts(tmp_path, []), name) == default


def test_every_option_is_a_flag_or_a_file_key():
    assert set(CASES) | {"autoscaling_config"} == set(serve_options.VALID_KEYS)


def test_reviewer_repro_port_and_name_from_the_file(tmp_path):
    opts = _opts(tmp_path, [], {"port": 8011, "name": "myapp", "dashboard-port": 8267})
    assert (opts.port, opts.name, opts.dashboard_port, opts.host) == (8011, "myapp", 8267, "127.0.0.1")
    cfg = tmp_path / "auto.yaml"
    cfg.write_text("autoscaling_config: {min_replicas: 1, max_replicas: 3}\n")
    opts = serve_options.resolve_options(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert opts.autoscaling_config == {"min_replicas": 1, "max_replicas": 3}


BAD_FILES = [
    ("prot: 8011\n", "unknown option 'prot'; valid keys: address, autoscaling_config, bundle"),
    ("config: other.yaml\n", "unknown option 'config'"),
    ("port: '8011'\n", "port must be an integer, got '8011'"),
    ("replicas: true\n", "replicas must be an integer, got True"),
    ("name: [a]\n", "name must be a string, got ['a']"),
    ("memory_budget: 1.5\n", "memory_budget must be a string or an integer, got 1.5"),
    ("autoscaling_config: 3\n", "autoscaling_config must be a mapping, got 3"),
    ("port: 70000\n", "port must be in 1..65535, got 70000"),
    ("replicas: 0\n", "replicas must be >= 1, got 0"),
    ("device: tpu\n", "device must be cpu or cuda, got 'tpu'"),
    ("memory-budget: lots\n", "memory_budget: invalid size 'lots'"),
    ("- port\n", "must hold a mapping of options; valid keys: address"),
    ("port: [\n", "cannot read --config"),
]


@pytest.mark.parametrize("text,message", BAD_FILES)
def test_bad_config_is_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, text, message):
    home = tmp_path / "home"
    monkeypatch.setenv("SLOTSERVE_HOME", str(home))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(text)
    assert main(["serve", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not home.exists()  # no store, no token, no Ray


def test_missing_config_file(tmp_path, capsys):
    assert main(["serve", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read --config" in capsys.readouterr().err


@pytest.mark.parametrize("which", ["port", "dashboard-port"])
def test_busy_port_is_one_line_before_ray(tmp_path, monkeypatch, capsys, which):
    home = tmp_path / "home"
    monkeypatch.setenv("SLOTSERVE_HOME", str(home))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        # the other port free, so the message can only be about this one
        other = "--dashboard-port" if which == "port" else "--port"
        t0 = time.time()
        assert main(["serve", f"--{which}", str(busy), other, str(_free_port())]) == 2
    assert time.time() - t0 < 5  # refused before building a bundle or starting Ray
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{busy} is already in use" in err, err
    assert f"choose another port with --{which}" in err
    assert not home.exists()


def test_bind_failures_from_ray_become_one_line():
    # what Ray raises when another process takes a port between our check and its bind
    proxy = RuntimeError("ray::ProxyActor.ready() (pid=1)\n  File ...\n"
                         "RuntimeError: Failed to bind to address '127.0.0.1:8000'.")
    assert serve.bind_failure(proxy) == ("HTTP API: cannot listen on 127.0.0.1:8000 (in use or not "
                                          "available); choose another port with --port")
    dash = ValueError("Failed to bind to 127.0.0.1:8265 because it's already occupied. You can use "
                      "`ray start --dashboard-port ...` or `ray.init(dashboard_port=...)` to select a different port.")
    assert serve.bind_failure(dash) == ("Ray dashboard: 127.0.0.1:8265 is already in use; choose another "
                                         "port with --dashboard-port")
    assert serve.bind_failure(RuntimeError("something else")) is None


# ---------------------------------------------------------------- a real start

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _listeners(pids: set[int]) -> list[tuple[str, str, int]]:
    """(local address, process name, pid) of every TCP listener owned by `pids`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        local = line.split()[3]
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((local, name, int(pid)))
    return found


def _loopback(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("ss"), reason="needs `ss` (iproute2) to list listening sockets")
def test_serve_takes_the_config_file_and_keeps_ray_on_loopback(tmp_path):
    port, dash = _free_port(), _free_port()
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"port: {port}\nname: cfgapp\ndashboard-port: {dash}\nreplicas: 1\n")
    env = {**os.environ, "SLOTSERVE_HOME": str(tmp_path / "home"), "SLOTSERVE_ADMIN_TOKEN": "t0k"}
    log = (tmp_path / "serve.log").open("w+")
    # cwd: not the repository root, which must never be on sys.path (docs: DESIGN, layout)
    proc = subprocess.Popen([sys.executable, "-P", "-m", "slotserve.cli", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                            start_new_session=True)
    try:
        t0 = time.time()
        while "Ctrl-C to stop." not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.time() - t0 < 240, "server did not come up"
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
        st = httpx.get(url + "/admin/state", headers={"authorization": "Bearer t0k"}, timeout=30).json()
        assert st["app"] == "cfgapp"

        found = _listeners(_descendants(proc.pid))
        assert (f"127.0.0.1:{port}" in {f[0] for f in found}
                and f"127.0.0.1:{dash}" in {f[0] for f in found}), found
        # The one listener Ray offers no setting for: each Serve replica's inter-deployment
        # gRPC server, hard-coded to "[::]:0" in ray/serve/_private/replica.py (token-
        # authenticated): one per replica process, the SlotServe replica and the Gateway.
        # Everything else (GCS, raylet, workers, agents, metrics) is loopback.
        outside = [f for f in found if not _loopback(f[0])]
        replicas = [f for f in outside if f[1].startswith("ray::ServeRepli")]
        assert outside == replicas and len({f[2] for f in replicas}) == len(replicas) <= 2, outside
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log.close()
    assert proc.returncode == 0 and "stopped." in (tmp_path / "serve.log").read_text()
