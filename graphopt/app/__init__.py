"""The command line and the jobs it runs, the only part of ``graphopt/`` that imports
``graphopt.backends`` (always inside functions):

- :mod:`.cli`: the argument parser and ``main`` (the ``graphopt`` console script);
- :mod:`.run`: ``graphopt run`` (pipeline, saved module, ORT comparison, report);
- :mod:`.commands`: ``passes``, ``inspect``, ``sweep``, ``bench``, ``emit-c`` and ``demo``;
- :mod:`.demo` and :mod:`.sweep`: the jobs behind ``demo`` and ``sweep``;
- :mod:`.console`: output lines, progress bars, logging and error lines, exit statuses;
- :mod:`.staging`: atomic output directories;
- :mod:`.loading` and :mod:`.ort`: model specs, traces and data checks; ONNX Runtime.
"""
