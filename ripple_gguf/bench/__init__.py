"""`ripple-gguf bench`: benchmarks of the product itself, outside the core import graph (nothing in
ripple_gguf imports this package but the CLI's `bench` subcommand).

  cli.py          argument parsing for `bench probe | io | e2e | scale | report`
  io_replay.py    held-out tokens through the runtime, cold, per placement and cache size (`bench io`)
  e2e.py          stock vs sparse end to end in memory cgroups (`bench e2e`)
  scale.py        the runtime at Llama-3-8B layer size, random weights (`bench scale`)
  project.py      projected 8B/70B tokens/s from what scale.py measured
  report.py       docs/BENCHMARKS.md from one invocation's JSON (scale_report.py: its scale section)
"""
