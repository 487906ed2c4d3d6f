"""Command lines run in processes forked from one that has already imported TensorFlow.

A test that needs a command in a process of its own (to kill it with SIGKILL, freeze it with
SIGSTOP, run two at once, or give it logical CPU devices) would pay TensorFlow's import, 6-12
seconds of CPU on a 2-core machine, for every process. :func:`start` runs the same command
line in a child of a multiprocessing fork server that imported TensorFlow, Keras and the
three commands once (per pytest process), so a child starts in a fraction of a second.

The child is a fresh process in what matters to the tests: its own PID, environment, working
directory, standard output and error, TensorFlow runtime (the server imports TensorFlow but
runs no operation, so no thread pool or device exists before the fork; logical devices can
still be set) and exit status. It runs the command as its entry point does: ``-m MODULE``
calls the module's console-script function ``cli``, a script path runs as ``__main__``, and
``-c CODE`` executes the code. A test of what happens at import (environment variables read
then, what an import writes) still starts a real interpreter with subprocess.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import runpy
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the fork server imports before it forks (ImportErrors are ignored by multiprocessing).
PRELOAD = ["tensorflow", "keras", "res_unet.make_tfrecords", "res_unet.train_resunet",
           "res_unet.seg_images_in_folder"]

_context: multiprocessing.context.ForkServerContext | None = None


def _server() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _child(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """The forked child: the environment, directory and output files of the command, then
    the command itself, its exit status the process's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (the process's own)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    code: object = 0
    try:
        if argv[0] == "-m":
            module = importlib.import_module(argv[1])
            sys.argv = [module.__file__, *argv[2:]]
            module.cli()
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    os._exit(code)


class Forked:
    """A started command, with the parts of :class:`subprocess.Popen` the tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess,
                 outputs: tempfile.TemporaryDirectory) -> None:
        self._process = process
        self.pid = process.pid
        self._outputs = outputs  # removed with this object
        self.stdout_path = Path(outputs.name) / "stdout"
        self.stderr_path = Path(outputs.name) / "stderr"

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (minus the signal's number when killed by one); raises
        TimeoutError after ``timeout`` seconds."""
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise TimeoutError(f"still running after {timeout} s")
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        self._process.kill()

    def output(self) -> tuple[str, str]:
        """(standard output, standard error) so far."""
        return self.stdout_path.read_text(), self.stderr_path.read_text()


def start(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike | None = None) -> Forked:
    """Start ``python ARGV`` (``["-m", module, ...]``, ``["-c", code, ...]`` or
    ``[script, ...]``; a leading ``sys.executable`` is dropped) in a forked child."""
    argv = [str(a) for a in argv]
    if argv[0] == sys.executable:
        argv = argv[1:]
    outputs = tempfile.TemporaryDirectory(prefix="forked-")
    out, err = Path(outputs.name) / "stdout", Path(outputs.name) / "stderr"
    out.touch()
    err.touch()
    process = _server().Process(target=_child, args=(
        argv, dict(os.environ if env is None else env), str(cwd or os.getcwd()), str(out),
        str(err)), daemon=False)
    process.start()
    return Forked(process, outputs)


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None, timeout: float = 600) -> tuple[int, str, str]:
    """Run ``argv`` as :func:`start` does and wait: (exit status, stdout, stderr)."""
    proc = start(argv, env=env, cwd=cwd)
    try:
        code = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return (code, *proc.output())
