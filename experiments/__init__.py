"""Benchmarks, the paper's experiments and their harness; each module is also a script
(`python experiments/<name>.py --help`)."""
