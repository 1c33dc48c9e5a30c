"""The command line and the jobs it runs: :mod:`.cli` (parser, logging, commands), :mod:`.demo`
and :mod:`.sweep`. The only part of ``graphopt/`` that imports ``graphopt.backends``.
"""
