"""Run a repository script with glibc's allocator defaults (the timing comparison only), from
the repository root: python results/timings-amd-epyc/glibc_defaults.py part1_classify.py ARGS"""

import runpy
import sys

sys.path.insert(0, ".")
import allocator  # noqa: E402

allocator.keep_freed_memory = lambda libc=None: "allocator: glibc's defaults (timing comparison)"
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
