"""wsiomics: whole-slide image + gene expression pretraining pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wsiomics")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
