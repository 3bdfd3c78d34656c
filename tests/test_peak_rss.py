"""The resident-memory peak a run reports is its own, not the process that started it."""

import subprocess
import sys

from script_runs import ROOT


def test_a_child_of_a_large_process_reports_its_own_peak():
    # Linux's ru_maxrss carries the parent's high-water mark across fork and exec
    parent = ("import subprocess, sys\n"
              "held = bytearray(600 * 2**20); held[::4096] = b'1' * len(held[::4096])\n"
              "code = 'from mmprune.base.memory import peak_rss_bytes; print(peak_rss_bytes())'\n"
              "print(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, cwd=ROOT, check=True)
    assert 0 < int(out.stdout.strip()) < 500 * 2**20
