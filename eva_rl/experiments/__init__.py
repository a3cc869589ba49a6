"""The experiment application on top of the eva-rl library: task, suite and sequence files, environments by name,
one run and its folder, the executors that carry runs out, the studies (suite, rank study, tuning sweep, continual
benchmark; each plan -> runs -> report -> page), statistics, benchmarks, and the command line.

It imports the library; the library never imports it.
"""
