"""Render the concrete compose file of one run: ``party-0 .. party-<n-1>`` as services.

The committed ``compose.yaml`` scales one ``party`` service to ``PARTIES`` replicas;
replicas cannot differ in mounts or limits, so each of them mounts the whole data
volume.  ``python -m testbed up`` renders this file instead, where party ``i``

* mounts only its own shard, ``<work>/data/party-<i>`` (read-only), and its own part
  directory ``<work>/parts/party-<i>``;
* asks for index ``i`` when it registers (``PARTY``), so its data, expert shard and
  link follow from the index;
* gets ``mem_limit`` = its ``memory_budget`` (or ``parties.memory_budget``) plus a fixed
  allowance for the interpreter and libraries (``mem_overhead``; a budget limits the
  model's state, not Python), and ``cpus`` from ``parties.cpus``;
* gets the run's CA certificate and only its own certificate and key, as compose
  ``secrets:`` (files in ``/run/secrets``; never variables, never in the run directory);
* switches to an unprivileged user (``party_user``) once its link is shaped, which
  also gives up ``NET_ADMIN`` (a process that leaves uid 0 loses its capabilities).

Every container has memory, CPU and pids limits: the scenario's where it sets them,
else the defaults (:data:`DEFAULT_LIMITS`).  The coordinator mounts all of
``<work>/data`` (read-only: it copies ``truth/`` and the public checkpoint into the run
directory), ``<work>/parts`` and the runs directory, where it writes the run directory.
Every service is on one ``internal: true`` network and has ``NET_ADMIN`` for ``tc``
(parties, until they drop it); ``no-new-privileges`` keeps a dropped privilege dropped.
"""
from pathlib import Path

from parties.base import party_name
from testbed.run.runner import party_budget

from testbed.net.identity import CA_FILE

from .process import COORDINATOR
from .settings import DEFAULT_PORT

SCENARIO_IN_CONTAINER = "/testbed/scenario.yaml"
# when the scenario is silent: memory (bytes), CPUs, processes/threads per container
DEFAULT_LIMITS = {"party_memory": 4 << 30, "coordinator_memory": 6 << 30, "cpus": 2.0, "pids": 512}
UNPRIVILEGED = "65534:65534"   # nobody:nogroup


def _limits(svc, memory, cpus, pids, threads):
    svc["mem_limit"] = svc["memswap_limit"] = int(memory)   # no swap: over the limit is OOM
    svc["cpus"] = cpus
    svc["pids_limit"] = int(pids)
    # torch threads: the embedded engine's count (``--threads``, default 1), not the CPU
    # limit: a reduction split over another number of threads rounds differently, and the
    # two engines agree bit for bit only with equal counts
    svc["environment"].setdefault("TESTBED_THREADS", str(threads))
    svc["security_opt"] = ["no-new-privileges:true"]


def _secrets(names):
    """The service's ``secrets:`` entries: the CA and ``names``' certificates and keys."""
    return [{"source": "ca", "target": "ca.crt"},
            *({"source": f"{n}-{kind}", "target": f"{n}.{kind}"} for n in names for kind in ("crt", "key"))]


def _common(image, scenario_file, env):
    return {"image": image, "init": True,
            "environment": {"SCENARIO": SCENARIO_IN_CONTAINER, "PYTHONUNBUFFERED": "1", **env},
            "volumes": [f"{scenario_file}:{SCENARIO_IN_CONTAINER}:ro"]}


def render_compose(scenario, *, image, work_dir, runs_dir, project_dir, run_name, credentials_dir,
                   n_parties, mem_overhead=1 << 30, probe_bytes=0, recv_timeout=600,
                   register_timeout=300, shaping="auto", run_as=None, party_user=UNPRIVILEGED,
                   limits=None, gpu=False, threads=1):
    """The compose file (a dict) of one run. ``n_parties``: party containers to start
    (0 when only single-site protocols run); ``credentials_dir``: where the run's
    certificates and keys are on the host (outside the runs directory); ``limits``:
    overrides of :data:`DEFAULT_LIMITS`; ``threads``: torch threads per process (the
    embedded run's ``--threads``)."""
    work, runs = Path(work_dir).resolve(), Path(runs_dir).resolve()
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    scenario_file = work / "scenario.yaml"
    net = {"RUN_NAME": run_name, "PORT": str(DEFAULT_PORT), "CREDENTIALS_DIR": "/run/secrets",
           "SHAPING": shaping, "RECV_TIMEOUT": str(recv_timeout),
           "REGISTER_TIMEOUT": str(register_timeout), "LINK_PROBE_BYTES": str(probe_bytes),
           "PARTS_DIR": "/parts", "DATA_DIR": "/data", "PRINT_SUMMARY": "0"}
    if run_as:
        net["RUN_AS"] = run_as
    services = {
        "prepare": {**_common(image, scenario_file, {"DATA_DIR": "/data", "BASE_DIR": "/project",
                                                     **({"RUN_AS": run_as} if run_as else {})}),
                    "command": ["prepare"], "network_mode": "none"},
        "coordinator": {**_common(image, scenario_file, {**net, "RESULTS_DIR": "/results"}),
                        "command": ["coordinator"], "cap_add": ["NET_ADMIN"], "networks": ["testbed"],
                        "depends_on": {"prepare": {"condition": "service_completed_successfully"}}},
    }
    services["prepare"]["volumes"] += [f"{work / 'data'}:/data", f"{Path(project_dir).resolve()}:/project:ro"]
    services["coordinator"]["volumes"] += [f"{work / 'data'}:/data:ro", f"{work / 'parts'}:/parts",
                                           f"{runs}:/results"]
    _limits(services["prepare"], limits["coordinator_memory"], limits["cpus"], limits["pids"], threads)
    _limits(services["coordinator"], limits["coordinator_memory"], scenario.coordinator.cpus or limits["cpus"],
            limits["pids"], threads)
    services["coordinator"]["secrets"] = _secrets([COORDINATOR])
    secrets = {"ca": {"file": str(Path(credentials_dir) / CA_FILE)}}
    for who in [COORDINATOR, *(party_name(i) for i in range(n_parties))]:
        for kind in ("crt", "key"):
            secrets[f"{who}-{kind}"] = {"file": str(Path(credentials_dir) / f"{who}.{kind}")}
    for i in range(n_parties):
        name = party_name(i)
        env = {**net, "PARTY": str(i), "COORDINATOR": f"coordinator:{DEFAULT_PORT}", "RUN_AS": party_user}
        svc = {**_common(image, scenario_file, env), "command": ["party"], "cap_add": ["NET_ADMIN"],
               "networks": ["testbed"], "secrets": _secrets([name]),
               "depends_on": {"prepare": {"condition": "service_completed_successfully"},
                              "coordinator": {"condition": "service_started"}}}
        svc["volumes"] += [f"{work / 'data' / name}:/data/{name}:ro",
                           f"{work / 'parts' / name}:/parts/{name}"]
        budget = party_budget(scenario, name)
        if budget is not None:
            svc["environment"]["TESTBED_GPU_MEMORY_BUDGET"] = str(budget)
        _limits(svc, budget + mem_overhead if budget is not None else limits["party_memory"],
                scenario.parties.cpus or limits["cpus"], limits["pids"], threads)
        if gpu:
            svc["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
        services[name] = svc
    if gpu:
        services["coordinator"]["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
    return {"services": services, "networks": {"testbed": {"internal": True}}, "secrets": secrets}


def work_dirs(work_dir, n_parties, party_user=None):
    """Create the host directories the rendered file bind-mounts (owned by the caller; a
    party's part directory by ``party_user`` "uid:gid" when the caller may give it away)."""
    import os
    work = Path(work_dir)
    for sub in ["data", "parts", *(f"parts/{party_name(i)}" for i in range(n_parties))]:
        (work / sub).mkdir(parents=True, exist_ok=True)
    if party_user and os.getuid() == 0:
        uid, _, gid = party_user.partition(":")
        for i in range(n_parties):
            os.chown(work / "parts" / party_name(i), int(uid), int(gid or uid))
    return work
