"""Transparent huge pages for the host's large allocations, set for glibc's malloc at start-up.

Why: XLA:CPU allocates the temporaries of each execution of a compiled step as one block and
frees it afterwards (MobileFaceNet's train step at batch 16: 619 MiB by XLA's memory analysis,
one mmap and munmap of that size a step under strace). glibc's malloc serves a block that large
with mmap and gives it back with munmap, so every step faults the whole block in again, 4 KiB at
a time, and the kernel zeroes each page: `python -m benchmarks.bench_huge_pages` prints the
faults, system time and step time with and without huge pages (benchmarks/README.md has its
figures). With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) malloc asks for transparent huge pages on its mappings
(madvise), so the block comes back in 2 MiB faults. PyTorch's CPU tensors go through the same
malloc and gain from it too; bench_train_step runs both sides under the same setting.

The tunable is read when a process starts, so `restart_with_huge_pages` executes the process's
own command again with it set; an entry point calls it first thing. Nothing happens where the
choice is already made (GLIBC_TUNABLES names glibc.malloc.hugetlb: `glibc.malloc.hugetlb=0` opts
out) or where it cannot help (not Linux with glibc >= 2.35, or the kernel's transparent huge
pages are off).
"""

import os
import pathlib
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_MIN_GLIBC = (2, 35)  # The first glibc with glibc.malloc.hugetlb.
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_page_environment(environ, glibc_version: str | None, thp_mode: str | None):
  """`environ` with glibc.malloc.hugetlb=1 added to GLIBC_TUNABLES, or None where it is not to
  change.

  Args:
    environ: the process's environment (a mapping).
    glibc_version: os.confstr("CS_GNU_LIBC_VERSION"), e.g. "glibc 2.36"; None when not glibc.
    thp_mode: the kernel's /sys/kernel/mm/transparent_hugepage/enabled, e.g. "always [madvise]
      never"; None when the kernel has no such file.
  """
  tunables = environ.get("GLIBC_TUNABLES", "")
  if HUGE_PAGES_TUNABLE in tunables or not glibc_version or not thp_mode:
    return None
  name, _, version = glibc_version.partition(" ")
  try:
    major_minor = tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None
  if name != "glibc" or major_minor < _MIN_GLIBC or "[never]" in thp_mode:
    return None
  return {
      **environ,
      "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE + "=1"))),
  }


def system_facts() -> tuple[str | None, str | None]:
  """This machine's glibc version and transparent huge page mode, as huge_page_environment takes
  them (None for each where there is none: not Linux, not glibc, no THP in the kernel)."""
  if not sys.platform.startswith("linux"):
    return None, None
  try:
    glibc_version = os.confstr("CS_GNU_LIBC_VERSION")
  except (ValueError, OSError):
    glibc_version = None
  try:
    thp_mode = _THP_MODE.read_text()
  except OSError:
    thp_mode = None
  return glibc_version, thp_mode


def restart_with_huge_pages() -> None:
  """Executes this process's command line again under huge_page_environment, where that changes
  the environment; returns otherwise. Call it before anything large is allocated."""
  environment = huge_page_environment(os.environ, *system_facts())
  if environment is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)
