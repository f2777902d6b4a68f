"""synthval: what is a synthetic image dataset worth on real images?"""

__version__ = "0.1.0"
