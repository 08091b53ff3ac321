"""``python -m testbed up SCENARIO``: run a scenario under Docker Compose.

    python -m testbed up scenarios/pcmoe-tiny.yaml [--set training.steps=4] [--runs runs]

Steps, one line each: make sure the image is current (``testbed/container/build-image.sh``,
seconds when nothing changed); render the run's compose file (one service per party,
each mounting only its own shard, with its memory and CPU limits,
:mod:`testbed.container.render`); ``docker compose up``; stream the coordinator's
progress (a line per training step); wait for it; tear everything down (always: also on
failure or Ctrl-C); print the same summary as ``run``.  The run directory lands in
``--runs`` (``manifest.json`` says ``mode: containers``), with the rendered compose file
beside the results as ``compose.rendered.yaml``.  There is no simulated clock in containers:
``sim_time`` in the metrics and the summary is wall time (seconds since the protocol started).

The run's credentials (a per-run CA, one certificate and key per container) are made in
a private temporary directory outside ``--runs`` and handed to each container as compose
``secrets:`` files -- its own key only -- then deleted with the containers.  Every
container gets memory, CPU and pids limits (``--party-memory``, ``--coordinator-memory``,
``--cpus``, ``--pids`` where the scenario is silent).

Nothing is lost: a party container killed by the kernel over its memory limit is reported
as such (``docker inspect``: ``State.OOMKilled``), naming the party -- in the error and in
the run's ``manifest.json``; when the coordinator itself dies, ``up`` merges every
process's part into the run directory and marks it ``failed`` naming the coordinator; the
parts of a run that did not end ``ok`` stay in ``<runs>/.work/<name>/parts/``.  Exit codes
as ``run``: 2 config, 3 protocol, 4 memory budget, 5 transport; 1 anything else.
"""
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from .run import add_scenario_arguments
from testbed.container.settings import ABORTED
from testbed.errors import ConfigError, TestbedError, fmt_bytes

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "testbed" / "container" / "build-image.sh"
PROJECT_LABEL = "com.docker.compose.project"
OOM_GRACE_S = 60   # how long the coordinator gets to notice a dead party and merge by itself
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# log records below WARNING and compose's own notices are not progress
QUIET = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ \w+ (INFO|DEBUG) |^\S+ exited with code \d+$")


class ContainerRunFailed(TestbedError):
    """The containerized run failed; carries the coordinator's exit code."""

    def __init__(self, message, exit_code=1, run_dir=None):
        super().__init__(message)
        self.exit_code, self.run_dir = exit_code, run_dir


def add_up_arguments(p):
    add_scenario_arguments(p)
    p.add_argument("--image", default=os.environ.get("TESTBED_IMAGE", "collab-testbed:latest"),
                   help="the project image every container runs (default: $TESTBED_IMAGE or "
                        "collab-testbed:latest); built offline with build-image.sh when missing or stale")
    p.add_argument("--no-build", action="store_true", help="use the image as it is (fail when missing)")
    p.add_argument("--gpu", action="store_true", help="reserve a GPU per container (nvidia runtime)")
    p.add_argument("--mem-overhead", default="1GiB",
                   help="added to a party's memory budget for its container limit (default 1GiB)")
    p.add_argument("--probe-bytes", default="0", help="bandwidth probe per link at startup, e.g. 1MiB")
    p.add_argument("--recv-timeout", type=float, default=600,
                   help="seconds a role may wait for one message before the run fails (default 600)")
    p.add_argument("--shaping", default="auto", choices=["auto", "tc", "sender", "off"],
                   help="how links are shaped: tc (kernel bandwidth shaping, needs NET_ADMIN), sender "
                        "(bandwidth, latency, jitter and loss in the sending transport), auto (tc for "
                        "bandwidth where the container may use it, the sender otherwise; default), off "
                        "(unshaped)")
    p.add_argument("--party-memory", default="4GiB",
                   help="memory limit of a party container whose scenario sets no memory_budget")
    p.add_argument("--coordinator-memory", default="6GiB", help="memory limit of the coordinator container")
    p.add_argument("--cpus", type=float, default=2.0,
                   help="CPU limit of a container whose scenario sets none (parties.cpus, coordinator.cpus)")
    p.add_argument("--pids", type=int, default=512, help="pids limit of every container")
    p.add_argument("--keep", action="store_true", help="leave the containers and work files for debugging")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _step(text):
    print(f"[up] {text}", flush=True)


def _compose(project, file, *args, check=True, capture=False):
    cmd = ["docker", "compose", "-p", project, "-f", str(file), *args]
    r = subprocess.run(cmd, text=True, capture_output=capture)
    if check and r.returncode != 0:
        detail = (r.stderr or r.stdout or "").strip().splitlines()[-5:] if capture else []
        raise ContainerRunFailed(f"`{' '.join(cmd[3:])}` failed (exit {r.returncode})"
                                 + (":\n  " + "\n  ".join(detail) if detail else ""))
    return r


def ensure_image(image, build=True):
    """Docker answers and the image is current (build-image.sh is quick when it is)."""
    if shutil.which("docker") is None:
        raise ContainerRunFailed("no docker client on PATH (testbed/container/install-docker.sh)")
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        raise ContainerRunFailed("no Docker daemon answers (run testbed/container/install-docker.sh)")
    if build:
        t = time.monotonic()
        r = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=ROOT, text=True, capture_output=True,
                           env={**os.environ, "IMAGE": image})
        if r.returncode != 0:
            raise ContainerRunFailed(f"{BUILD_SCRIPT.name} failed:\n{(r.stderr or r.stdout)[-2000:]}")
        _step(f"image {image} ready ({time.monotonic() - t:.0f}s)")
    elif subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        raise ContainerRunFailed(f"image {image} does not exist (drop --no-build)")


def _containers(project):
    import docker
    client = docker.from_env()
    return {c.labels.get("com.docker.compose.service"): c
            for c in client.containers.list(all=True, filters={"label": f"{PROJECT_LABEL}={project}"})}


def _party_deaths(project):
    """Party containers that exited with an error: {service: cause}."""
    out = {}
    for svc, c in _containers(project).items():
        if not svc or not svc.startswith("party-"):
            continue
        c.reload()
        state = c.attrs["State"]
        failed = state["ExitCode"] not in (0, ABORTED) or state["OOMKilled"]
        if state["Status"] in ("exited", "dead") and failed:
            limit = c.attrs["HostConfig"].get("Memory") or 0
            out[svc] = (f"container OOM-killed (memory limit {fmt_bytes(limit)})" if state["OOMKilled"]
                        else f"exited with code {state['ExitCode']}")
    return out


def _follow(project, file):
    """Stream the coordinator's output (progress lines) to stdout, in a thread."""
    proc = subprocess.Popen(["docker", "compose", "-p", project, "-f", str(file), "logs", "-f",
                             "--no-color", "--no-log-prefix", "coordinator"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def pump():
        for line in proc.stdout:
            line = ANSI.sub("", line)
            if not QUIET.search(line):
                sys.stdout.write("  " + line)
                sys.stdout.flush()
    threading.Thread(target=pump, daemon=True).start()
    return proc


def _wait(project):
    """Wait for the coordinator to exit; stop it when a party died and it does not notice.
    Returns (coordinator exit code, {party: cause})."""
    deaths, first_death = {}, None
    while True:
        coord = _containers(project).get("coordinator")
        coord.reload()
        if coord.attrs["State"]["Status"] in ("exited", "dead"):
            # parties that exit after the coordinator (told to abort) are a consequence, not a
            # cause -- unless the kernel killed them
            late = {p: c for p, c in _party_deaths(project).items() if "OOM" in c}
            state = coord.attrs["State"]
            if state["OOMKilled"]:
                limit = coord.attrs["HostConfig"].get("Memory") or 0
                deaths["coordinator"] = f"container OOM-killed (memory limit {fmt_bytes(limit)})"
            elif state["ExitCode"] in (137, 143) or state["ExitCode"] < 0:
                deaths["coordinator"] = f"container killed (exit code {state['ExitCode']})"
            return state["ExitCode"], {**deaths, **late}
        seen = _party_deaths(project)
        # after the first failure the others are told to abort: only the kernel's kills still count
        deaths.update(seen if first_death is None else {p: c for p, c in seen.items() if "OOM" in c})
        if deaths and first_death is None:
            first_death = time.monotonic()
            _step(f"party failure: {'; '.join(f'{p}: {c}' for p, c in sorted(deaths.items()))}")
        if first_death is not None and time.monotonic() - first_death > OOM_GRACE_S:
            coord.kill(signal="SIGTERM")
            first_death = float("inf")
        time.sleep(1.0)


def _finish_run_dir(run_dir, rendered, deaths, scenario, parts, code):
    """Beside the results: the rendered compose file; in the manifest: what killed a party.
    A run whose coordinator died before finishing it is merged here, from the parts."""
    from testbed.container.merge import recover_run
    shutil.copy(rendered, run_dir / "compose.rendered.yaml")
    from testbed.rundir import testbed_identity
    manifest = json.loads((run_dir / "manifest.json").read_text())
    if manifest.get("status") == "running":
        cause = deaths.get("coordinator") or f"exited with code {code} before finishing the run"
        _step(f"the coordinator died ({cause}); merging the parts here")
        manifest = recover_run(run_dir, parts, scenario, f"coordinator: {cause}")
    deaths = {p: c for p, c in deaths.items() if p != "coordinator"}
    manifest["testbed"] = testbed_identity()   # the image has no git checkout; the host does
    if deaths:
        manifest["containers"] = {**manifest.get("containers", {}), "party_failures": deaths}
        causes = "; ".join(f"{p}: {c}" for p, c in sorted(deaths.items()))
        if manifest.get("status") != "ok" and not manifest.get("error", "").startswith(causes):
            manifest["error"] = f"{causes} -- {manifest.get('error')}"
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    summary_path = run_dir / "summary.json"
    if summary_path.exists():   # the coordinator wrote its own path; the host's is this one
        summary = json.loads(summary_path.read_text())
        summary["run"] = str(run_dir)
        summary_path.write_text(json.dumps(summary, indent=2))
        return summary, manifest
    return None, manifest


def main_up(args):
    from testbed.units import parse_size

    from .checks import light_problems
    from .run import check_runs_dir, load_with_overrides

    for flag, value in (("--mem-overhead", args.mem_overhead), ("--probe-bytes", args.probe_bytes)):
        try:                                               # arguments and files first: fast answers
            parse_size(value)
        except ValueError as exc:
            raise ConfigError(flag, [str(exc)]) from None
    sc = load_with_overrides(args.scenario, args.set)
    check_runs_dir(args.runs)
    problems = light_problems(sc)
    if problems:
        raise ConfigError(args.scenario, problems)
    from testbed.container.coordinator import parties_needed
    from testbed.container.credentials import ensure_credentials
    from testbed.container.render import UNPRIVILEGED, render_compose, work_dirs
    from testbed.run.summary import format_summary

    runs = Path(args.runs).resolve()
    name = args.name or f"{sc.name}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if (runs / name).exists():
        raise ContainerRunFailed(f"run directory {runs / name} exists already (choose --name)")
    project = "testbed-" + re.sub(r"[^a-z0-9_-]", "-", name.lower())
    ensure_image(args.image, build=not args.no_build)
    n = parties_needed(sc)
    host_user = f"{os.getuid()}:{os.getgid()}" if os.getuid() != 0 else None
    party_user = host_user or UNPRIVILEGED
    work = work_dirs(runs / ".work" / name, n, party_user)
    (work / "scenario.yaml").write_text(yaml.safe_dump(sc.resolved(), sort_keys=False))
    # the run's CA and keys: outside the runs directory, for this run only
    credentials = Path(tempfile.mkdtemp(prefix="testbed-credentials-"))
    ensure_credentials(credentials, n)
    rendered = work / "compose.rendered.yaml"
    compose = render_compose(
        sc, image=args.image, work_dir=work, runs_dir=runs, project_dir=Path.cwd(), run_name=name,
        credentials_dir=credentials, n_parties=n, mem_overhead=parse_size(args.mem_overhead),
        probe_bytes=parse_size(args.probe_bytes), recv_timeout=args.recv_timeout, shaping=args.shaping,
        run_as=host_user, party_user=party_user, gpu=args.gpu, threads=args.threads,
        limits={"party_memory": parse_size(args.party_memory),
                "coordinator_memory": parse_size(args.coordinator_memory),
                "cpus": args.cpus, "pids": args.pids})
    rendered.write_text(yaml.safe_dump(compose, sort_keys=False))
    _step(f"rendered {rendered} ({n} party containers)")
    follower, code, deaths = None, None, {}
    try:
        t = time.monotonic()
        _step("preparing data (one shard per party)")
        try:
            _compose(project, rendered, "up", "-d", "--quiet-pull", capture=True)
        except ContainerRunFailed as exc:   # prepare's own error is in its log, not compose's
            logs = _compose(project, rendered, "logs", "--no-color", "--no-log-prefix", "--tail", "5",
                            "prepare", check=False, capture=True).stdout.strip()
            raise ContainerRunFailed(f"{exc}" + (f"\nprepare:\n  {logs}" if logs else ""),
                                     exc.exit_code) from None
        _step(f"containers started ({time.monotonic() - t:.0f}s); coordinator output follows")
        follower = _follow(project, rendered)
        code, deaths = _wait(project)
    finally:
        if follower is not None:
            follower.terminate()
        if args.keep:
            _step(f"left running: docker compose -p {project} -f {rendered} down -v "
                  f"(credentials in {credentials})")
        else:
            _compose(project, rendered, "down", "-v", "--remove-orphans", "-t", "5", check=False,
                     capture=True)
            shutil.rmtree(credentials, ignore_errors=True)
            _step("containers removed")
    run_dir = runs / name
    if not (run_dir / "manifest.json").exists():
        raise ContainerRunFailed(f"the coordinator exited with {code} before creating {run_dir}"
                                 + (f"; {deaths}" if deaths else "") + f" (work files kept in {work})",
                                 code or 1)
    summary, manifest = _finish_run_dir(run_dir, rendered, deaths, sc, work / "parts", code)
    if manifest.get("status") != "ok":   # what each process wrote stays, whatever was merged
        _step(f"run failed: every process's part is kept in {work / 'parts'}")
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.parent.rmdir()   # runs/.work, when no other run uses it
        except OSError:
            pass
    if code != 0 or manifest.get("status") != "ok":
        # 130: `up` stopped the coordinator because a party had died
        raise ContainerRunFailed(manifest.get("error") or f"the coordinator exited with {code}",
                                 code if code and code != 130 else 1, run_dir)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
