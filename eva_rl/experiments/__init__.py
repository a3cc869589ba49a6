"""The experiment application on top of the eva-rl library: task and suite files, environments by name, fine-tuning
runs with evaluation and checkpoints, the comparison harness and its statistics, benchmarks, and the command line.

It imports the library; the library never imports it.
"""
