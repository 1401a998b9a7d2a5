"""Tests of adam_face.host_memory: when the environment gets glibc.malloc.hugetlb=1, and that the
restarted process runs once more with it and gets huge pages for a large array."""

import os
import subprocess
import sys

import pytest

from adam_face import host_memory

from fixtures_data import REPO_ROOT

THP = "always [madvise] never"


@pytest.mark.parametrize(
    "tunables, glibc, thp, want",
    [
        (None, "glibc 2.36", THP, "glibc.malloc.hugetlb=1"),
        (
            "glibc.malloc.arena_max=2",
            "glibc 2.35",
            THP,
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        ("glibc.malloc.hugetlb=0", "glibc 2.36", THP, None),  # The user's choice stands.
        ("glibc.malloc.hugetlb=1", "glibc 2.36", THP, None),  # Already restarted.
        (None, "glibc 2.34", THP, None),  # No such tunable before 2.35.
        (None, "glibc 3.0", THP, "glibc.malloc.hugetlb=1"),
        (None, None, THP, None),  # musl, macOS: no glibc.
        (None, "glibc 2.36", "always madvise [never]", None),
        (None, "glibc 2.36", None, None),  # No transparent huge pages in the kernel.
    ],
)
def test_environment_gets_the_tunable_only_where_it_helps(tunables, glibc, thp, want):
  environ = {"PATH": "/bin"} if tunables is None else {"PATH": "/bin", "GLIBC_TUNABLES": tunables}
  before = dict(environ)
  got = host_memory.huge_page_environment(environ, glibc, thp)
  assert environ == before
  if want is None:
    assert got is None
  else:
    assert got == {**environ, "GLIBC_TUNABLES": want}


_CHILD = """
import ctypes, os, resource
from adam_face import host_memory
print("started", os.environ.get("GLIBC_TUNABLES", ""))
host_memory.restart_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 * 2**20  # By glibc's malloc as XLA's temporaries (numpy madvises its own).
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_child(tunables: str | None) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  done = subprocess.run(
      [sys.executable, "-c", _CHILD], env=env, cwd=REPO_ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr
  return done.stdout.splitlines()


def test_restart_runs_the_command_again_with_huge_pages():
  glibc, thp = host_memory.system_facts()
  expected = host_memory.huge_page_environment({}, glibc, thp)
  lines = run_child(None)
  if expected is None:
    assert lines[0] == "started " and len(lines) == 2
    pytest.skip(f"no huge pages to ask for here (glibc {glibc!r}, THP {thp!r}): ran once")
  assert lines[:2] == ["started ", "started glibc.malloc.hugetlb=1"]
  # 65,536 faults in 4 KiB pages, 128 in 2 MiB pages.
  assert int(lines[2].split()[1]) < 2_000, lines


def test_an_explicit_choice_is_kept():
  lines = run_child("glibc.malloc.hugetlb=0")
  assert lines[0] == "started glibc.malloc.hugetlb=0" and len(lines) == 2
  if "[madvise]" in (
      host_memory.system_facts()[1] or ""
  ):  # Huge pages only where malloc asks: 4 KiB here.
    assert int(lines[1].split()[1]) > 30_000, lines
