"""`ripple-gguf bench`: benchmarks of the product itself, outside the core import graph (nothing in
ripple_gguf imports this package but the CLI's `bench` subcommand).

  cli.py        argument parsing for `bench io | e2e | report`
  io_replay.py  cold I/O replay of recorded activity through the cost model (`bench io`)
  e2e.py        stock vs sparse end to end in memory cgroups (`bench e2e`)
  report.py     docs/BENCHMARKS.md from one invocation's JSON
"""
