"""A compiled step's build as a worker runs it (`step_builds.py`): in a child process that leaves nothing running when
it is stopped or its worker dies, and once per package among the workers that share a cache directory. The child
here stands in for the compiler: a Python process that starts a grandchild (`sleep`, as inductor starts g++)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers.built_steps import slot_cache
from helpers.processes import pid_written_to, process_exits
from helpers.tiny_model import tiny_model
from inference_worker import aot_step, file_lock, step_builds
from inference_worker.attention import reduction_attention
from inference_worker.model_runner import family_decoder


def compiler_like(pid_file: Path, before: str = "") -> list[str]:
    """A child that runs `before`, then starts a long `sleep` (its compiler), writes its pid and waits."""
    script = (
        f"import subprocess, time\n{before}\ncompiler = subprocess.Popen(['sleep', '600'])\n"
        f"open({str(pid_file)!r}, 'w').write(f'{{compiler.pid}}\\n')\ntime.sleep(600)"
    )
    return [sys.executable, "-c", script]


def test_a_stopped_build_leaves_none_of_its_processes_running(tmp_path: Path) -> None:
    stop, pid_file = threading.Event(), tmp_path / "compiler.pid"
    with ThreadPoolExecutor(1) as pool:
        build = pool.submit(step_builds.run_child, compiler_like(pid_file), tmp_path / "output.txt", stop)
        compiler = pid_written_to(pid_file)
        stop.set()
        assert build.result(timeout=60) is None  # stopped
    assert process_exits(compiler), "the build's compiler outlived the stopped build"


def test_a_build_whose_worker_dies_kills_its_compilers(tmp_path: Path) -> None:
    """The worker is SIGKILLed mid-build: the child gets SIGTERM (PR_SET_PDEATHSIG) and kills its process group."""
    pid_file = tmp_path / "compiler.pid"
    child = compiler_like(
        pid_file, "from inference_worker.build_child import die_with_parent; import os; die_with_parent(os.getppid())"
    )
    worker_script = (
        "import subprocess, sys, time; "
        f"subprocess.Popen({child!r}, start_new_session=True, stdin=subprocess.DEVNULL); time.sleep(600)"
    )
    worker = subprocess.Popen([sys.executable, "-c", worker_script], cwd=Path(__file__).parents[1])
    try:
        compiler = pid_written_to(pid_file)
    finally:
        worker.kill()
        worker.wait()
    assert process_exits(compiler), "the build's compiler outlived its worker"


def test_a_worker_waits_for_another_workers_build_of_the_same_package_and_can_be_stopped(tmp_path: Path) -> None:
    package, stop, waiting = tmp_path / "decode-x.pt2", threading.Event(), threading.Event()
    entered: list[str] = []

    def second_worker() -> None:
        with step_builds.build_lock(package, stop, on_wait=waiting.set):
            entered.append("second")

    with ThreadPoolExecutor(1) as pool:
        with step_builds.build_lock(package):  # the first worker's build
            second = pool.submit(second_worker)
            assert waiting.wait(60)
            assert entered == []  # it waits for the first build
        assert second.result(timeout=60) is None and entered == ["second"]  # then takes the lock in its turn

        waiting.clear()
        with step_builds.build_lock(package):
            stopped = pool.submit(second_worker)
            assert waiting.wait(60)
            stop.set()  # the worker stops while it waits
            with pytest.raises(step_builds.BuildStopped):
                stopped.result(timeout=60)
    assert entered == ["second"]


def test_a_failed_build_says_why(tmp_path: Path) -> None:
    output = tmp_path / "output.txt"
    code = step_builds.run_child([sys.executable, "-c", "import sys; print('no g++'); sys.exit(3)"], output)
    assert code == 3 and "no g++" in output.read_text()


def test_a_held_lock_file_is_not_removed_and_a_free_one_is(tmp_path: Path) -> None:
    lock = tmp_path / "decode-x.lock"
    with file_lock.exclusive(lock) as locked:
        assert locked
        file_lock.remove_if_free(lock)  # `tidy` at another worker's start, during a build
        assert lock.exists()
    file_lock.remove_if_free(lock)
    assert not lock.exists()


def test_a_waiter_whose_lock_file_was_removed_takes_a_new_one(tmp_path: Path) -> None:
    """The holder removes the file as it lets go (as `remove_if_free` does); the waiter then holds a file that no
    path names, which a newcomer could not see: it must start again on the path's own file."""
    lock, waiting, held = tmp_path / "decode-x.lock", threading.Event(), []

    def waiter() -> None:
        with file_lock.exclusive(lock, on_wait=waiting.set):
            held.append(lock.exists())
            with pytest.raises(BlockingIOError), open(lock) as newcomer:
                fcntl.flock(newcomer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the waiter's lock is the path's

    with ThreadPoolExecutor(1) as pool:
        with file_lock.exclusive(lock):
            second = pool.submit(waiter)
            assert waiting.wait(60)
            lock.unlink()
        second.result(timeout=60)
    assert held == [True]


def output_line(directory: Path, text: str, within: float = 120.0) -> str | None:
    """The first line holding `text` in the output of a build child of `directory`, once it has written one."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for output in directory.glob("build-*/output.txt"):
            for line in output.read_text(errors="replace").splitlines():
                if text in line:
                    return line
        time.sleep(0.1)
    return None


def test_builds_of_one_package_for_two_cache_directories_take_turns_in_the_shared_compiler_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker, with a cache directory of its own but the same inductor cache, holds that cache's lock of
    this package (it builds it): this build's child waits for it before compiling anything there, and can be
    stopped meanwhile."""
    compiler_cache = tmp_path / "inductor"
    compiler_cache.mkdir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(compiler_cache))  # the build's child inherits it
    tiny = tiny_model()
    cache = slot_cache(tiny, rows=1)
    step = aot_step.DecodeStep(family_decoder(tiny, cache.row_len), reduction_attention)
    package, stop = tmp_path / "worker-b" / "decode-x.pt2", threading.Event()
    with ThreadPoolExecutor(1) as pool, file_lock.exclusive(compiler_cache / "decode-x.build.lock"):
        building = pool.submit(step_builds.build_in_child, step, cache.keys, cache.values, package, True, False, stop)
        try:
            waited = output_line(package.parent, "waiting for another build of decode-x in the compiler cache")
        finally:
            stop.set()
        with pytest.raises(step_builds.BuildStopped):
            building.result(timeout=60)
    assert waited is not None, "the build did not wait for the other build of its package"
    assert not package.exists()


def test_a_build_ignores_autotuning_asked_for_by_the_environment(tmp_path: Path) -> None:
    """`TORCHINDUCTOR_MAX_AUTOTUNE=1` in a worker's environment reached its build child, whose packages then held
    AMX tile code that killed the process running them (SIGILL), under a name that does not say so. The real child
    runs here, with `aot_step.build` replaced by one that records inductor's settings at the build."""
    job, seen = tmp_path / "job.pt", tmp_path / "seen.txt"
    script = f"""
import os, torch
from inference_worker import aot_step, build_child
spec = {{"step": None, "keys": [], "values": [], "frozen": False, "single": False, "name": "decode-x"}}
torch.save(spec, {str(job)!r})
def build(*args):
    c = torch._inductor.config
    open({str(seen)!r}, "w").write(f"{{c.max_autotune}} {{c.max_autotune_gemm}} {{c.max_autotune_pointwise}}")
aot_step.build = build
build_child.remove_compiler_copies = lambda package: None
build_child.main({str(job)!r}, {str(tmp_path / "package.pt2")!r}, str(os.getppid()), "1")
"""
    environment = {
        **os.environ,
        "TORCHINDUCTOR_MAX_AUTOTUNE": "1",
        "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM": "1",
        "TORCHINDUCTOR_MAX_AUTOTUNE_POINTWISE": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], env=environment, check=True)
    assert seen.read_text() == "False False False"
