"""The pipeline steps: one module per `synthval` subcommand, each a thin `run_<step>` that wires libraries.

The CLI calls a step; a step calls the libraries below it (data, detection, scoring, results, render,
io, demo) and returns the small JSON the CLI writes to XCom. A step never imports another step, so what
one subcommand does can be read in one file.
"""
