"""apps/launch.py passes the ranks' lines through and leaves the launcher's own out.

The torchrun text below is what torch 2.13's agent printed when one of 2 ranks exited with code 1
(the rank had printed its one line first); MPICH's banner is what its mpiexec prints then.
"""

from __future__ import annotations

import io
import sys
import threading

from moecomm.apps.launch import _Forward, run_job

TORCHRUN_FAILURE = """\
[demo] rank 1 failed: ValueError: boom
W1201 12:03:35.094000 20899 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 20943 closing signal SIGTERM
E1201 12:03:35.095000 20899 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 1 (pid: 20944) of binary: /usr/bin/python
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
moecomm.apps.ep_demo FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
============================================================
"""

MPICH_FAILURE = """\
[demo] rank 1 failed: ValueError: boom

===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 123 RUNNING AT host
=   EXIT CODE: 1
===================================================================================
"""


def _forward(text: str, launcher: str) -> tuple[str, _Forward]:
    out = io.StringIO()
    f = _Forward(io.StringIO(text), out, launcher, threading.Event())
    f.run()
    return out.getvalue(), f


def test_torchrun_failure_report_is_dropped():
    out, f = _forward(TORCHRUN_FAILURE, "torchrun")
    assert out == "[demo] rank 1 failed: ValueError: boom\n"
    assert f.first_failure == (1, 1)


def test_mpich_banner_is_dropped():
    out, _ = _forward(MPICH_FAILURE, "mpirun")
    assert out.strip() == "[demo] rank 1 failed: ValueError: boom"


def test_run_job_passes_output_and_says_who_failed_first(capfd):
    code = ("import sys; print('rank line', flush=True); "
            f"sys.stderr.write({TORCHRUN_FAILURE!r}); sys.exit(1)")
    assert run_job([sys.executable, "-c", code], {}, timeout_s=60, launcher="torchrun") == 1
    captured = capfd.readouterr()
    assert captured.out == "rank line\n"
    assert captured.err.splitlines() == [
        "[demo] rank 1 failed: ValueError: boom",
        "[demo] torchrun: local rank 1 ended first, with exit code 1; the others were stopped"]


def test_run_job_timeout_stops_the_job(capfd):
    assert run_job([sys.executable, "-c", "import time; time.sleep(60)"], {}, timeout_s=1, launcher="torchrun") == 124
    assert "did not finish within 1 s" in capfd.readouterr().err
