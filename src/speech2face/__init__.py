"""Speech2Face (Oh et al., CVPR 2019) as a reproducible pipeline: library code.

Stage scripts in ``stages/`` are thin wrappers over the modules here.
"""

__version__ = "0.1.0"
