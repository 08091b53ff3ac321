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
  model's state, not Python), and ``cpus`` from ``parties.cpus``.

The coordinator mounts all of ``<work>/data`` (read-only: it copies ``truth/`` and the
public checkpoint into the run directory), ``<work>/parts`` and the runs directory,
where it writes the run directory.  Every service is on one ``internal: true`` network
and has ``NET_ADMIN`` for ``tc``.
"""
import math
from pathlib import Path

from parties.base import party_name
from testbed.run.runner import party_budget

from .settings import DEFAULT_PORT

SCENARIO_IN_CONTAINER = "/testbed/scenario.yaml"


def _common(image, scenario_file, env):
    return {"image": image, "init": True,
            "environment": {"SCENARIO": SCENARIO_IN_CONTAINER, "PYTHONUNBUFFERED": "1", **env},
            "volumes": [f"{scenario_file}:{SCENARIO_IN_CONTAINER}:ro"]}


def render_compose(scenario, *, image, work_dir, runs_dir, project_dir, run_name, secret,
                   n_parties, mem_overhead=1 << 30, probe_bytes=0, recv_timeout=600,
                   register_timeout=300, shaping="auto", run_as=None, gpu=False):
    """The compose file (a dict) of one run. ``n_parties``: party containers to start
    (0 when only single-site protocols run)."""
    work, runs = Path(work_dir).resolve(), Path(runs_dir).resolve()
    scenario_file = work / "scenario.yaml"
    net = {"RUN_SECRET": secret, "RUN_NAME": run_name, "PORT": str(DEFAULT_PORT),
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
    if scenario.coordinator.cpus:
        services["coordinator"]["cpus"] = scenario.coordinator.cpus
        services["coordinator"]["environment"]["TESTBED_THREADS"] = str(math.ceil(scenario.coordinator.cpus))
    for i in range(n_parties):
        name = party_name(i)
        env = {**net, "PARTY": str(i), "COORDINATOR": f"coordinator:{DEFAULT_PORT}"}
        svc = {**_common(image, scenario_file, env), "command": ["party"], "cap_add": ["NET_ADMIN"],
               "networks": ["testbed"],
               "depends_on": {"prepare": {"condition": "service_completed_successfully"},
                              "coordinator": {"condition": "service_started"}}}
        svc["volumes"] += [f"{work / 'data' / name}:/data/{name}:ro",
                           f"{work / 'parts' / name}:/parts/{name}"]
        budget = party_budget(scenario, name)
        if budget is not None:
            svc["mem_limit"] = int(budget + mem_overhead)
            svc["memswap_limit"] = int(budget + mem_overhead)   # no swap: over the limit is OOM
            svc["environment"]["TESTBED_GPU_MEMORY_BUDGET"] = str(budget)
        if scenario.parties.cpus:
            svc["cpus"] = scenario.parties.cpus
            svc["environment"]["TESTBED_THREADS"] = str(math.ceil(scenario.parties.cpus))
        if gpu:
            svc["deploy"] = {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
        services[name] = svc
    if gpu:
        services["coordinator"]["deploy"] = {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]}}}
    return {"services": services, "networks": {"testbed": {"internal": True}}}


def work_dirs(work_dir, n_parties):
    """Create the host directories the rendered file bind-mounts (owned by the caller)."""
    work = Path(work_dir)
    for sub in ["data", "parts", *(f"parts/{party_name(i)}" for i in range(n_parties))]:
        (work / sub).mkdir(parents=True, exist_ok=True)
    return work
