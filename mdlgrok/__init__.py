"""mdlgrok: the complexity dynamics of grokking (DeMoss et al. 2024), as a package."""

__version__ = "0.1.0"
