"""CPU sets and CPU time for the bench, read back from the kernel (/proc) for real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infergate.benchmarks.cpus import (
    CpuSetError,
    allowed_cpus,
    children_pinned_to,
    default_split,
    descendants,
    format_cpu_list,
    parse_cpu_list,
    tree_cpu_s,
    usable_cpus,
)
from infergate.benchmarks.scenarios import serving


def _threads_allowed(pid: int) -> set[str]:
    """Cpus_allowed_list of every thread of ``pid``."""
    found = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(line.split(":", 1)[1].strip())
    return found


def test_cpu_lists_parse_and_format_in_the_kernels_notation():
    assert parse_cpu_list("0-3,6") == {0, 1, 2, 3, 6}
    assert parse_cpu_list(" 5 ") == {5}
    assert format_cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    assert format_cpu_list(parse_cpu_list("3,1,2")) == "1-3"
    for bad in ("", "a", "3-1", "1-", "-2"):
        with pytest.raises(CpuSetError) as err:
            parse_cpu_list(bad)
        assert repr(bad) in str(err.value)


def test_default_split_gives_servers_the_first_half_and_load_the_rest():
    assert default_split(frozenset({0, 1})) == ({0}, {1})
    assert default_split(frozenset(range(16))) == (set(range(8)), set(range(8, 16)))
    assert default_split(frozenset({2, 5, 9})) == ({2}, {5, 9})
    assert default_split(frozenset({3})) is None


def test_a_process_started_inside_the_block_runs_on_the_cpus_given_and_the_caller_is_restored():
    cpus = sorted(usable_cpus())
    chosen = frozenset({cpus[-1]})
    before = os.sched_getaffinity(0)
    with children_pinned_to(chosen):
        child = subprocess.Popen([sys.executable, "-c", "import threading, time; threading.Thread(target=time.sleep, args=(5,)).start(); time.sleep(5)"])
    try:
        time.sleep(0.5)
        assert _threads_allowed(child.pid) == {str(cpus[-1])}
        assert os.sched_getaffinity(0) == before
    finally:
        child.kill()
        child.wait()


def test_tree_cpu_time_includes_a_busy_child():
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(10)"])
    try:
        me = os.getpid()
        before = tree_cpu_s(me)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and tree_cpu_s(child.pid) < 0.5:
            time.sleep(0.1)
        assert child.pid in descendants(me)
        assert tree_cpu_s(child.pid) >= 0.5
        assert tree_cpu_s(me) - before >= 0.4  # the child's time counts for its parent's tree
    finally:
        child.kill()
        child.wait()


def test_every_server_of_the_serving_scenario_and_all_its_threads_run_on_the_server_cpus(tmp_path):
    cpus = sorted(usable_cpus())
    server = frozenset({cpus[-1]})
    with serving(tmp_path, server_cpus=server) as targets:
        assert {t.name for t in targets} == {"ceiling", "lean", "gateway-onnx"}
        for target in targets:
            assert target.pid is not None and target.description, target
            for pid in [target.pid, *descendants(target.pid)]:
                assert _threads_allowed(pid) == {str(cpus[-1])}, (target.name, pid)
            assert allowed_cpus(target.pid) == str(cpus[-1])
            assert tree_cpu_s(target.pid) > 0
