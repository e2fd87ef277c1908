"""Speech2Face (Oh et al., CVPR 2019) as a reproducible pipeline: library code.

Stage scripts in ``stages/`` are thin wrappers over the modules here: ``core`` (shared
machinery), ``data`` (the data stages and their file formats), ``models`` (the networks),
``training`` and ``evaluation``. The map: ARCHITECTURE.md.
"""

__version__ = "0.1.0"
