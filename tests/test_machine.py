"""fastres/machine.py: what a stored choice and a benchmark result say about where they ran."""
import datetime
import os

import torch

from fastres import machine
from fastres.bench import environment
from fastres.dispatch import choice


def test_device_name_names_the_cpu_model_and_its_cores():
    name = machine.device_name("cpu")
    assert machine.cpu_name() and machine.cpu_name() in name
    assert f"({os.cpu_count()} cores)" in name
    assert machine.device_name(torch.device("cpu")) == name


def test_versions_are_those_of_the_running_software():
    import fastres
    found = machine.versions()
    assert found["fastres"] == fastres.__version__ and found["torch"] == torch.__version__
    try:
        import triton
    except Exception:  # noqa: BLE001
        assert found["triton"] is None
    else:
        assert found["triton"] == triton.__version__


def test_load_and_time_read_the_machine():
    loads = machine.load_average()
    if hasattr(os, "getloadavg"):
        assert len(loads) == 3 and all(v >= 0 for v in loads)
        # Runnable threads a core: never below what the one-minute average says.
        assert machine.load_per_core() >= loads[0] / os.cpu_count() - 0.05
    stamp = datetime.datetime.strptime(machine.utc_now(), "%Y-%m-%dT%H:%M:%SZ")
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    assert abs((now - stamp).total_seconds()) < 5


def test_a_choice_and_a_bench_result_name_the_machine_alike():
    """The one rule, used by both: a cached choice and a bench result never disagree."""
    env = environment.environment(torch.device("cpu"))
    made = choice.provenance("cpu")
    assert made["device"] == env["device_name"]
    assert made["versions"] == {k: env[k] for k in ("fastres", "torch", "triton")}
