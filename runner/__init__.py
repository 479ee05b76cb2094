"""The secure-run command line (click) and the orchestration of verify -> policy -> sandbox -> run.

Thin by design: each command parses its options, makes one library call, and renders the result
as text or ``--json``. Nothing imports this package.

    $ secure-run --help
"""
